"""Token ids and labels for one conversation: template segments, `<image>` expanded, replies supervised.

Each segment is tokenized on its own (no special tokens added) so the boundary between prompt and reply is exact;
every `<image>` becomes `image_tokens` copies of the image token id. Labels are -100 except on supervised segments.
Truncation to `max_length` never cuts inside an image: such a row raises `TooLong` (the dataset drops and counts
it, or fails in strict mode).
"""

from __future__ import annotations

from dataclasses import dataclass

from epic.data.templates import IMAGE_PLACEHOLDER, Template, Turn

IGNORE_INDEX = -100


class TooLong(ValueError):
    """The row cannot be cut to `max_length` without cutting an image or losing every supervised token."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def _tokenize(text: str, tokenizer, image_token_id: int, image_tokens: int) -> list[int]:
    ids: list[int] = []
    for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index:
            ids += [image_token_id] * image_tokens
        if piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


def encode_segments(
    segments: list[tuple[str, bool]], tokenizer, image_token_id: int, image_tokens: int, add_bos: bool
) -> Encoded:
    """Concatenate the segments' tokens; labels copy the ids of supervised segments and are -100 elsewhere."""
    input_ids: list[int] = []
    labels: list[int] = []
    if add_bos and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, supervised in segments:
        ids = _tokenize(text, tokenizer, image_token_id, image_tokens)
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
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
