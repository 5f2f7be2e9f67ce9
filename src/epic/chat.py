"""Talk to a LLaVA model about an image, compressed: a session that keeps its KV cache across turns, and the terminal
loop behind `epic chat`.

The first turn prefills the prompt with the image under `epic.compress` (the visual tokens are pruned once, before
layer K); every later turn feeds only the new text (the end of the previous answer and the next question, as the
chat template writes them) on top of the same cache, so the dropped visual tokens stay dropped and nothing is
recomputed. Answers are greedy and streamed piece by piece; each ends with a `Cost` (kept tokens, prefill time, KV
cache bytes read from the cache tensors, decoding speed).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Generator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image

import epic
from epic.compat import Layout, cache_layer_count, cache_length
from epic.data.dataset import image_token_count
from epic.data.encoding import encode_prompt
from epic.data.images import prepare_image
from epic.data.templates import IMAGE_PLACEHOLDER, REPLY_SENTINEL, Template, Turn, reply_stop_ids
from epic.eval.cost import measured_cache_bytes

FULL = "none"  # the method name for no compression (every visual token kept)
DEMO_MODELS = ("tcd", "stage1", "base")  # what `epic demo` saves under <root>/models/, in order of preference
# what `open_image` reads: common raster formats only (never EPS, which Pillow hands to Ghostscript, nor rarer decoders)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers multi-picture JPEGs (MPO)
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb warning level (it refuses only at twice that)
COMMANDS = (
    ("/tokens N", "keep N visual tokens per image (the conversation starts over)"),
    ("/method NAME", f"compress with NAME ({', '.join(sorted(epic.METHODS))}, or {FULL}); starts over"),
    ("/image PATH", "talk about another image (starts over)"),
    ("/reset", "forget the conversation, keep the settings"),
    ("/help", "this list"),
    ("/quit", "leave (or Ctrl-D)"),
)


class ChatError(ValueError):
    """A bad setting or input; the message names what is wrong."""


@dataclass(frozen=True)
class Cost:
    """What one answer cost: the prefill of its new tokens, the decoding steps and the cache left behind."""

    kept: int  # visual tokens kept past layer K
    total: int  # visual tokens of the image
    prefill_tokens: int  # tokens fed by this turn's prefill (the whole prompt at the first turn, new text later)
    prefill_seconds: float
    cache_bytes: int  # key and value tensors of the KV cache after the answer
    decode_tokens: int  # tokens produced by decoding steps (the first one comes from the prefill)
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float | None:
        """Decoding speed (one token per step), None when the answer took no decoding step."""
        return self.decode_tokens / self.decode_seconds if self.decode_tokens and self.decode_seconds > 0 else None

    def line(self) -> str:
        """One line: kept/total visual tokens, prefill ms (and tokens), KV cache size, decoding tokens/s."""
        speed = self.tokens_per_second
        return (
            f"[kept {self.kept}/{self.total} visual tokens | prefill {self.prefill_seconds * 1e3:.1f} ms "
            f"({self.prefill_tokens} tokens) | KV cache {format_bytes(self.cache_bytes)} | "
            + (f"{speed:.1f} tokens/s]" if speed is not None else "- tokens/s]")
        )


@dataclass(frozen=True)
class Answer:
    text: str
    cost: Cost


def format_bytes(count: int) -> str:
    """`123 B`, `45.6 KiB`, `7.8 MiB`, `1.2 GiB`."""
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def open_image(source: Path | str, max_bytes: int | None = None) -> Image.Image:
    """Open an image file as RGB, or raise `ChatError` naming the file: missing, too large (bytes, or pixels: more
    than `MAX_PIXELS`, checked from the header before decoding), or not an image in one of `IMAGE_FORMATS`."""
    path = Path(source)
    if not path.is_file():
        raise ChatError(f"image file not found: {path}")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ChatError(f"{path.name} is {format_bytes(size)}, over the upload limit of {format_bytes(max_bytes)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with a message
            with Image.open(path, formats=IMAGE_FORMATS) as opened:
                if opened.width * opened.height > MAX_PIXELS:
                    raise ChatError(
                        f"{path.name} has too many pixels ({opened.width}x{opened.height}, more than {MAX_PIXELS:,})"
                    )
                return opened.convert("RGB")
    except Image.DecompressionBombError as error:
        raise ChatError(f"{path.name} has too many pixels ({error})") from None
    except OSError:
        raise ChatError(
            f"{path.name} is not an image in a format Pillow can read here ({', '.join(IMAGE_FORMATS)})"
        ) from None


def default_demo_model(root: Path = Path("epic-demo")) -> Path:
    """The model `epic demo` trained under `root`: `models/tcd`, else its stage-1 or base model; else an error."""
    for name in DEMO_MODELS:
        folder = Path(root) / "models" / name
        if (folder / "config.json").is_file():
            return folder
    looked = ", ".join(str(Path(root) / "models" / name) for name in DEMO_MODELS)
    raise ChatError(
        f"no model given and none trained by `epic demo` (looked for {looked}): run `epic demo` first, "
        "or pass a LLaVA model folder"
    )


def load_chat_model(folder: Path, template: str | None = None) -> tuple[object, object, Template]:
    """Model (eval mode), processor and chat template of a LLaVA folder: `template`, else the one stored with an
    epic checkpoint, else the tokenizer's own chat template."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from epic.data.templates import get_template
    from epic.models.factory import EPIC_FILE, saved_template

    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    if template is None:
        template = saved_template(folder) if (Path(folder) / EPIC_FILE).is_file() else "tokenizer"
    try:
        return model, processor, get_template(template, processor.tokenizer)
    except ValueError as error:
        raise ChatError(f"{error}; choose a chat template with --template") from None


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
        layers = model.config.text_config.num_hidden_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < layers:
            raise ChatError(f"layer must be a whole number in [1, {layers - 1}] for this {layers}-layer model")
        if max_new_tokens < 1:
            raise ChatError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.layer = layer
        self.max_new_tokens = max_new_tokens
        self.image_mode = image_mode
        self.method = self._checked_method(method)
        self.tokens = self.image_tokens if tokens is None else self._checked_tokens(tokens)
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
        self._handle: epic.Compression | None = None
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

    def _checked_method(self, method: str) -> str:
        if method != FULL and method not in epic.METHODS:
            raise ChatError(f"unknown method {method!r}; choose one of {', '.join([*sorted(epic.METHODS), FULL])}")
        return method

    def _checked_tokens(self, tokens: int) -> int:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ChatError(f"tokens must be a whole number >= 0, got {tokens!r}")
        if tokens > self.image_tokens:
            raise ChatError(
                f"a budget of {tokens} visual tokens is larger than the image ({self.image_tokens} visual tokens)"
            )
        return tokens

    def set_method(self, method: str) -> str:
        """Switch method; the conversation starts over. Returns a message saying so."""
        self.method = self._checked_method(method)
        return self._restart()

    def set_tokens(self, tokens: int) -> str:
        """Switch budget; the conversation starts over. Returns a message saying so."""
        self.tokens = self._checked_tokens(tokens)
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
                self._handle = epic.compress(self.model, self.method, tokens=self.tokens, layer=self.layer)
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


# ---------------------------------------------------------------------------------------------- terminal
def run_command(session: ChatSession, line: str) -> str:
    """Apply one `/command` to the session; the message to show. Raises `ChatError` on a bad command."""
    name, _, argument = line.strip().partition(" ")
    argument = argument.strip()
    if name == "/reset":
        session.reset()
        return f"conversation reset ({session.settings()})"
    if name == "/help":
        return "\n".join(f"  {usage:<14} {what}" for usage, what in COMMANDS)
    if name in ("/tokens", "/method", "/image") and not argument:
        raise ChatError(
            f"{name} needs a value, e.g. "
            + {"/tokens": "/tokens 36", "/method": "/method fastv"}.get(name, "/image photo.png")
        )
    if name == "/tokens":
        try:
            tokens = int(argument)
        except ValueError:
            raise ChatError(f"/tokens takes a whole number, got {argument!r}") from None
        return session.set_tokens(tokens)
    if name == "/method":
        return session.set_method(argument)
    if name == "/image":
        return session.set_image(argument)
    raise ChatError(f"unknown command {name!r}; commands: {', '.join(usage.split()[0] for usage, _ in COMMANDS)}")


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """Read questions and `/commands` until `/quit` or end of input; stream each answer, then its cost line.
    Errors are printed and the loop goes on; Ctrl-C stops an answer (and starts the conversation over)."""
    print(f"epic chat: {session.settings()}. /help lists the commands.", file=out)
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return 0
        if not line:
            continue
        if line == "/quit":
            return 0
        try:
            if line.startswith("/"):
                print(run_command(session, line), file=out)
                continue
            print("model> ", end="", file=out, flush=True)
            answer = session.ask(line, lambda piece: print(piece, end="", file=out, flush=True))
            print(f"\n{answer.cost.line()}", file=out, flush=True)
        except ChatError as error:
            print(f"error: {error}", file=out, flush=True)
        except KeyboardInterrupt:
            print(f"\n(answer interrupted; the conversation starts over: {session.settings()})", file=out, flush=True)
