"""Token ids and labels for one conversation: template segments, `<image>` expanded, replies supervised.

The rendered text is tokenized as a whole between `<image>` placeholders (each becomes `image_tokens` copies of the
image token id); character offsets decide which tokens belong to a reply. Labels are IGNORE_INDEX except on replies.
Truncation to `max_length` never cuts inside an image: such a row raises `TooLong` (the dataset drops and counts
it, or fails in strict mode).
"""

from __future__ import annotations

from dataclasses import dataclass

from epic.data.templates import IMAGE_PLACEHOLDER, Template, Turn
from epic.labels import IGNORE_INDEX


class TooLong(ValueError):
    """The row cannot be cut to `max_length` without cutting an image or losing every supervised token."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode_segments(
    segments: list[tuple[str, bool]], tokenizer, image_token_id: int, image_tokens: int, add_bos: bool
) -> Encoded:
    """Tokenize the rendered conversation; a token is supervised when its last character lies in a reply.

    The text is tokenized as a whole between `<image>` placeholders (as LLaVA does), not segment by segment, so
    a SentencePiece tokenizer sees `ASSISTANT: red` exactly as in pre-training; each placeholder becomes
    `image_tokens` copies of the image token id.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("epic needs a fast tokenizer (character offsets decide which tokens are supervised)")
    text = "".join(part for part, _ in segments)
    supervised = [False] * len(text)
    cursor = 0
    for part, is_reply in segments:
        if is_reply:
            supervised[cursor : cursor + len(part)] = [True] * len(part)
        cursor += len(part)
    input_ids: list[int] = []
    labels: list[int] = []
    if add_bos and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    offset = 0
    for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index:
            input_ids += [image_token_id] * image_tokens
            labels += [IGNORE_INDEX] * image_tokens
            offset += len(IMAGE_PLACEHOLDER)
        if piece:
            encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            for token, (first, last) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
                where = offset + max(last - 1, first)
                input_ids.append(token)
                labels.append(token if where < len(text) and supervised[where] else IGNORE_INDEX)
        offset += len(piece)
    return Encoded(input_ids, labels)


def encode_conversation(
    turns: list[Turn],
    template: Template,
    tokenizer,
    image_token_id: int,
    image_tokens: int,
    max_length: int | None = None,
) -> Encoded:
    """Training ids and labels for a whole conversation, truncated to `max_length` where that is safe."""
    eos = tokenizer.eos_token or ""
    encoded = encode_segments(template.render(turns, eos), tokenizer, image_token_id, image_tokens, template.add_bos)
    if max_length is None or len(encoded.input_ids) <= max_length:
        return encoded
    if image_token_id in encoded.input_ids[max_length:]:
        raise TooLong(f"{len(encoded.input_ids)} tokens: cutting to {max_length} would cut an image")
    labels = encoded.labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise TooLong(f"{len(encoded.input_ids)} tokens: cutting to {max_length} leaves no supervised token")
    return Encoded(encoded.input_ids[:max_length], labels)


def encode_prompt(
    turns: list[Turn], template: Template, tokenizer, image_token_id: int, image_tokens: int
) -> list[int]:
    """Generation ids: the conversation up to the assistant's cue, tokenized exactly as in training."""
    segments = template.prompt(turns, tokenizer.eos_token or "")
    return encode_segments(segments, tokenizer, image_token_id, image_tokens, template.add_bos).input_ids
