"""A conversation with a LLaVA model about an image, compressed: the library part of `epic chat` and `epic web`.

The first turn prefills the prompt with the image under `epic.compress` (the visual tokens are pruned once, before
layer K); every later turn feeds only the new text (the end of the previous answer and the next question, as the
chat template writes them) on top of the same cache, so the dropped visual tokens stay dropped and nothing is
recomputed. Answers are greedy and streamed piece by piece; each ends with a `Cost` (kept tokens, prefill time, KV
cache bytes read from the cache tensors, decoding speed). Nothing here reads input or prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from contextlib import closing
from pathlib import Path

import torch
from PIL import Image

from epic.chat.answers import Answer, ChatError, Cost
from epic.chat.image_files import open_image
from epic.compat import Layout, cache_layer_count, cache_length
from epic.compression import Budget, Compression, compress
from epic.compression.registry import method_names
from epic.data.dataset import image_token_count
from epic.data.encoding import encode_prompt
from epic.data.images import prepare_image
from epic.data.templates import IMAGE_PLACEHOLDER, REPLY_SENTINEL, Template, Turn, reply_stop_ids
from epic.eval.cost import measured_cache_bytes

FULL = "none"  # the method name for no compression (every visual token kept)


def _text(segments: list[tuple[str, bool]]) -> str:
    return "".join(text for text, _ in segments)


class ChatSession:
    """A conversation about one image with a model, compressed (`method`, `tokens` kept per image, from `layer`)
    or not (`method="none"`, or `tokens` equal to the image's visual tokens).

    The compression stays attached to the model from the first turn until `reset()` / `close()` (the cache it
    filled can only be continued under it); use the session as a context manager to detach it at the end.
    """

    def __init__(
        self,
        model,
        processor,
        template: Template,
        image: Path | str | Image.Image | None = None,
        method: str = "dart",
        tokens: int | None = None,
        layer: int = 2,
        max_new_tokens: int = 64,
        image_mode: str = "pad",
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.image_tokens = image_token_count(processor)
        if max_new_tokens < 1:
            raise ChatError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.layer = layer
        self.max_new_tokens = max_new_tokens
        self.image_mode = image_mode
        self.method, self.tokens = self._checked(method, self.image_tokens if tokens is None else tokens)
        self.image: Image.Image | None = None
        self.last: Answer | None = None
        self._stop_ids = self._find_stop_ids()
        self._image_token = torch.tensor([processor.image_token_id], device=next(model.parameters()).device)
        self._turns: list[Turn] = []
        self._layout = Layout.of(model)  # the installed transformers' cache names
        self._cache = None
        self._pending: int | None = None  # the last generated token: part of the conversation, not yet in the cache
        self._asked = 0  # bumped by every question and reset: an answer runs only if nothing came after it
        self._feeding: int | None = None  # the question whose answer is being fed to the cache, between its tokens
        self._handle: Compression | None = None
        self.kept_patches: list[int] | None = None  # patch-grid indices kept at the first turn (row-major)
        if image is not None:
            self.set_image(image)

    # ------------------------------------------------------------------------------------------ settings
    @property
    def compressed(self) -> bool:
        """Whether answers run compressed (a method and a budget below the image's visual tokens)."""
        return self.method != FULL and self.tokens < self.image_tokens

    def settings(self) -> str:
        """The settings in words, e.g. `dart, 16 of 64 visual tokens kept from layer 2`."""
        if not self.compressed:
            return f"no compression, all {self.image_tokens} visual tokens"
        return f"{self.method}, {self.tokens} of {self.image_tokens} visual tokens kept from layer {self.layer}"

    def _checked(self, method: str, tokens: int) -> tuple[str, int]:
        """`(method, tokens)` when the engine accepts them with this session's layer (a trial attach, detached at
        once); what it refuses as a `ChatError` with its message. The session's own word: `none`, no compression."""
        if method != FULL and method not in method_names():
            raise ChatError(f"unknown method {method!r}; choose one of {', '.join([*method_names(), FULL])}")
        try:
            Budget(tokens=tokens).resolve(self.image_tokens)  # `none` too: a later /method keeps the budget
            if method != FULL:
                compress(self.model, method, tokens=tokens, layer=self.layer).remove()
        except ValueError as error:
            raise ChatError(str(error)) from None
        return method, tokens

    def set_method(self, method: str) -> str:
        """Switch method; the conversation starts over. Returns a message saying so."""
        self.method, _ = self._checked(method, self.tokens)
        return self._restart()

    def set_tokens(self, tokens: int) -> str:
        """Switch budget; the conversation starts over. Returns a message saying so."""
        _, self.tokens = self._checked(self.method, tokens)
        return self._restart()

    def set_image(self, image: Path | str | Image.Image) -> str:
        """Switch image (a file or a PIL image); the conversation starts over. Returns a message saying so."""
        opened = image if isinstance(image, Image.Image) else open_image(image)
        self.image = prepare_image(opened, self.image_mode, self.processor.image_processor)
        return self._restart()

    def _restart(self) -> str:
        started = bool(self._turns)
        self.reset()
        if started:
            return f"{self.settings()}; the conversation starts over (its KV cache cannot be reused)"
        return self.settings()

    def reset(self) -> None:
        """Forget the conversation and its cache; detach the compression from the model."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self._cache = None
        self._pending = None
        self._feeding = None
        self._asked += 1  # answers asked for before this one will not run
        self._turns = []
        self.kept_patches = None

    def close(self) -> None:
        self.reset()

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ the cache
    def cache_lengths(self) -> list[int]:
        """Positions held by the KV cache per decoder layer (shorter from layer K on when compressed)."""
        if self._cache is None:
            return []
        return [cache_length(self._cache, index) for index in range(cache_layer_count(self._cache))]

    def _find_stop_ids(self) -> set[int]:
        """End-of-sequence ids, and the special token the template closes a reply with (`</s>`, `<|im_end|>`)."""
        eos = self.model.generation_config.eos_token_id
        stop = set(eos if isinstance(eos, list) else [eos]) | reply_stop_ids(self.template, self.tokenizer)
        return {token for token in stop if token is not None}

    def _first_prompt(self, question: str) -> list[int]:
        turns = [Turn("user", f"{IMAGE_PLACEHOLDER}\n{question}")]
        return encode_prompt(turns, self.template, self.tokenizer, self.processor.image_token_id, self.image_tokens)

    def _continuation(self, question: str) -> list[int]:
        """Ids that follow the cache: the last token of the previous answer unless it was a stop token (the template's
        closing stands for it), the reply's closing as the template writes it and the next user turn with the
        assistant's cue: together, what encoding the whole conversation from scratch gives after the cache."""
        asked = self._turns[:-1]  # the conversation as prompted last time (ends on the user)
        try:
            before = _text(self.template.prompt(asked, self.tokenizer.eos_token or ""))
            after = _text(
                self.template.prompt(
                    [*asked, Turn("assistant", REPLY_SENTINEL), Turn("user", question)], self.tokenizer.eos_token or ""
                )
            )
        except ValueError as error:
            raise ChatError(
                f"the {self.template.name!r} template cannot continue this conversation ({error}); /reset to ask anew"
            ) from None
        if not after.startswith(before) or after.count(REPLY_SENTINEL) != 1:
            raise ChatError(f"the {self.template.name!r} template does not extend a conversation turn by turn")
        tail = after.partition(REPLY_SENTINEL)[2]
        ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"]
        if self._pending in self._stop_ids:
            return ids
        return [self._pending, *ids]

    def _forward(self, ids: list[int], pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Feed `ids` after the cache; the logits of the last position (the image token ruled out)."""
        device = next(self.model.parameters()).device
        past = 0 if self._cache is None else cache_length(self._cache)
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, past + len(ids), dtype=torch.long, device=device),
                pixel_values=pixel_values,
                use_cache=True,
                logits_to_keep=1,
                **self._layout.with_cache(self._cache),
            )
        self._cache = self._layout.output_cache_of(out)
        return out.logits[0, -1].index_fill(0, self._image_token, float("-inf"))  # the model never says <image>

    # ------------------------------------------------------------------------------------------ answering
    def stream(self, question: str) -> Generator[str, None, None]:
        """Answer `question` greedily: an iterator over the text, piece by piece; `self.last` holds the `Answer`
        once it is exhausted. Bad input raises `ChatError` here, before anything runs."""
        question = question.replace(IMAGE_PLACEHOLDER, "").strip()
        if not question:
            raise ChatError("empty question")
        if self.image is None:
            raise ChatError("no image: give one with /image PATH")
        if self._feeding is not None:  # an answer was left unfinished: the cache holds half of it
            self.reset()
        ids = self._continuation(question) if self._turns else self._first_prompt(question)
        self._asked += 1
        return self._generate(question, ids, self._asked)

    def _superseded(self) -> ChatError:
        return ChatError("this answer was superseded by a later question, setting or reset; ask again")

    def _generate(self, question: str, ids: list[int], number: int) -> Generator[str, None, None]:
        if number != self._asked:
            raise self._superseded()
        self._feeding = number
        first = not self._turns
        pixel_values = None
        if first:
            pixels = self.processor.image_processor(self.image, return_tensors="pt")["pixel_values"]
            pixel_values = pixels.to(next(self.model.parameters()).device, self.model.dtype)
            if self.compressed:
                self._handle = compress(self.model, self.method, tokens=self.tokens, layer=self.layer)
        try:
            start = time.perf_counter()
            logits = self._forward(ids, pixel_values)
            prefill_seconds = time.perf_counter() - start
            if first:
                self._record_kept(ids)
            generated: list[int] = []
            shown = ""
            decode_seconds = 0.0
            while True:
                token = int(logits.argmax())
                generated.append(token)
                text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
                visible = text.rstrip("\ufffd")  # hold back a character still being spelled out in bytes
                if visible.startswith(shown) and len(visible) > len(shown):
                    yield visible[len(shown) :]
                    shown = visible
                    if self._feeding != number:  # another question or a reset came while this one waited
                        raise self._superseded()
                if token in self._stop_ids or len(generated) == self.max_new_tokens:
                    break
                start = time.perf_counter()
                logits = self._forward([token])
                decode_seconds += time.perf_counter() - start
        except BaseException:
            if self._feeding == number:  # not when a later question or setting already started over
                self.reset()  # an interrupted turn leaves the cache half-written
            raise
        kept = self.image_tokens if self.kept_patches is None else len(self.kept_patches)
        cost = Cost(
            kept,
            self.image_tokens,
            len(ids),
            prefill_seconds,
            measured_cache_bytes(self._cache),
            len(generated) - 1,
            decode_seconds,
        )
        user_text = f"{IMAGE_PLACEHOLDER}\n{question}" if first else question
        self._turns += [Turn("user", user_text), Turn("assistant", shown)]
        self._pending = generated[-1]
        self._feeding = None
        self.last = Answer(shown, cost)

    def _record_kept(self, ids: list[int]) -> None:
        first_image = ids.index(self.processor.image_token_id)
        if self._handle is None:
            self.kept_patches = list(range(self.image_tokens))
        else:
            self.kept_patches = [int(position) - first_image for position in self._handle.kept[0]]

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer `question` (calling `on_text` with each streamed piece) and return the `Answer` with its cost."""
        with closing(self.stream(question)) as pieces:  # an interruption in `on_text` closes (and resets) the turn
            for piece in pieces:
                if on_text is not None:
                    on_text(piece)
        return self.last
