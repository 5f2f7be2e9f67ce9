"""`epic chat`: a conversation reuses its compressed KV cache across turns, streams, obeys commands and refuses bad
input with a message naming it."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
import torch

from epic.chat import ChatError, ChatSession, open_image
from epic.chat.terminal import chat_loop, run_command
from epic.cli import main
from epic.data.encoding import encode_prompt
from epic.data.templates import IMAGE_PLACEHOLDER, Turn, get_template
from tests.chat_helpers import SPEC, save_tiny_chat
from tests.helpers import reference_logits

QUESTIONS = ("What color is the shape at the center?", "Is there a red circle in the image? Answer yes or no.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny saved LLaVA (vicuna_v1) and its parts in memory, beside `scene.png` and `notes.png` (not an image)."""
    folder = tmp_path_factory.mktemp("chat")
    return folder, *save_tiny_chat(folder)


def reader(lines: list[str]):
    """A stand-in for `input`: the lines, then end of input."""
    remaining = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(remaining)
        except StopIteration:
            raise EOFError from None

    return read


def session(tiny, template: str = "vicuna_v1", **kwargs) -> ChatSession:
    folder, model, processor = tiny
    options = {"method": "dart", "tokens": 9, "layer": 2, "max_new_tokens": 6, **kwargs}
    return ChatSession(model, processor, get_template(template, processor.tokenizer), folder / "scene.png", **options)


class Forwards:
    """Records the input ids and last-position logits of every forward of the model."""

    def __init__(self, model) -> None:
        self.ids: list[list[int]] = []
        self.logits: list[torch.Tensor] = []
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after),
        ]

    def _before(self, module, args, kwargs) -> None:
        self.ids.append(kwargs["input_ids"][0].tolist())

    def _after(self, module, args, output) -> None:
        self.logits.append(output.logits[0, -1].clone())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def conversation_ids(tiny, answer: str, template: str = "vicuna_v1") -> tuple[list[int], list[int]]:
    """The first prompt and the whole two-turn conversation as the template encodes it from scratch."""
    _, _, processor = tiny
    tokenizer = processor.tokenizer
    template = get_template(template, tokenizer)
    first = [Turn("user", f"{IMAGE_PLACEHOLDER}\n{QUESTIONS[0]}")]
    whole = [*first, Turn("assistant", answer), Turn("user", QUESTIONS[1])]
    encode = lambda turns: encode_prompt(turns, template, tokenizer, processor.image_token_id, SPEC.image_tokens)  # noqa: E731
    return encode(first), encode(whole)


@pytest.mark.parametrize(
    ("method", "template", "layer"),
    [
        ("dart", "vicuna_v1", 2),
        ("none", "vicuna_v1", 2),
        ("fastv", "chatml", 2),
        ("dart", "tokenizer", 2),
        ("divprune", "vicuna_v1", 0),  # before the LLM: every layer's cache is short
    ],
)
def test_second_turn_prefills_only_the_new_text_on_the_same_cache(tiny, method, template, layer):
    _, model, processor = tiny
    forwards = Forwards(model)
    try:
        with session(tiny, template, method=method, layer=layer) as chat:
            first = chat.ask(QUESTIONS[0])
            turn_one = len(forwards.ids)
            lengths_before = chat.cache_lengths()
            kept = chat._handle.kept[0] if chat.compressed else None
            second = chat.ask(QUESTIONS[1])
            lengths_after = chat.cache_lengths()
    finally:
        forwards.remove()
    fed = [ids[0] for ids in forwards.ids[1:turn_one]]  # each decoding step fed one token (not the last one)
    prompt, whole = conversation_ids(tiny, first.text, template)
    cached = len(prompt) + len(fed)
    assert forwards.ids[0] == prompt and whole[:cached] == prompt + fed
    # the second turn's prefill: exactly the conversation's new tokens (the first answer's last token, the reply's
    # closing, the next question and the cue), appended to the cache of the first turn; the image is not seen again
    assert forwards.ids[turn_one] == whole[cached:]
    assert second.cost.prefill_tokens == len(whole) - cached < SPEC.image_tokens
    assert first.cost.prefill_tokens == len(prompt)
    # dropped visual tokens stay dropped: layers >= K hold the shorter cache, turn after turn
    dropped = SPEC.image_tokens - (SPEC.image_tokens if method == "none" else 9)
    grown = len(forwards.ids) - turn_one - 1 + len(whole) - cached
    for index, (before, after) in enumerate(zip(lengths_before, lengths_after, strict=True)):
        assert before == (cached if index < layer else cached - dropped)
        assert after == before + grown
    assert first.cost.kept == SPEC.image_tokens - dropped and first.cost.total == SPEC.image_tokens
    per_position = 2 * SPEC.num_kv_heads * (SPEC.hidden_size // SPEC.num_heads) * 4  # K and V, float32, per layer
    assert second.cost.cache_bytes == sum(lengths_after) * per_position
    # and the continuation computes what the whole conversation would, with the dropped tokens masked from layer K
    batch = {
        "input_ids": torch.tensor([whole]),
        "attention_mask": torch.ones(1, len(whole), dtype=torch.long),
        "pixel_values": processor.image_processor(chat.image, return_tensors="pt")["pixel_values"],
    }
    if kept is None:
        kept = torch.arange(SPEC.image_tokens) + prompt.index(processor.image_token_id)
    reference = reference_logits(model, batch, [kept], layer=layer)
    torch.testing.assert_close(forwards.logits[turn_one], reference[0, -1], atol=1e-4, rtol=0)
    assert not model._forward_pre_hooks and not model._forward_hooks  # closing the session detached everything


@pytest.mark.parametrize("template", ["vicuna_v1", "chatml"])
def test_a_reply_the_model_stopped_is_closed_once_as_the_template_writes_it(tiny, template):
    """vicuna_v1 closes a reply with </s>, the model's own stop token: it is not fed twice. ChatML closes it with
    <|im_end|>: a model that stopped on </s> (also a stop token) must not leave that </s> in the cache. Either way
    the next turn continues exactly the conversation the template encodes from scratch."""
    _, model, processor = tiny
    eos = processor.tokenizer.eos_token_id

    def always_eos(module, args, logits):
        return logits.index_fill(-1, torch.tensor(eos), 1e4)

    force_eos = model.lm_head.register_forward_hook(always_eos)
    forwards = Forwards(model)
    try:
        with session(tiny, template) as chat:
            pieces: list[str] = []
            first = chat.ask(QUESTIONS[0], pieces.append)
            chat.ask(QUESTIONS[1])
    finally:
        forwards.remove()
        force_eos.remove()
    assert first.text == "" and pieces == [] and first.cost.decode_tokens == 0
    prompt, whole = conversation_ids(tiny, "", template)
    assert forwards.ids[1] == whole[len(prompt) :]
    assert forwards.ids[1].count(eos) == (1 if template == "vicuna_v1" else 0)


def test_an_unfinished_answer_is_not_continued_and_cannot_undo_a_later_conversation(tiny):
    with session(tiny) as chat:
        chat.ask(QUESTIONS[0])
        left = chat.stream(QUESTIONS[1])
        next(left)  # half of an answer is in the cache, and the reader went on to another question
        third = chat.ask(QUESTIONS[0])
        assert third.cost.prefill_tokens > SPEC.image_tokens  # started over with the image, not on the half answer
        lengths = chat.cache_lengths()
        with pytest.raises(ChatError, match="superseded"):
            next(left)
        left.close()
        assert chat.cache_lengths() == lengths  # the later conversation is still there
        assert chat.ask(QUESTIONS[1]).cost.prefill_tokens < SPEC.image_tokens  # and continues
        unused = chat.stream(QUESTIONS[0])  # asked for, never read: nothing was fed
        assert chat.ask(QUESTIONS[1]).cost.prefill_tokens < SPEC.image_tokens
        with pytest.raises(ChatError, match="superseded"):
            next(unused)  # its ids were for a conversation that has moved on
        stale = chat.stream(QUESTIONS[0])
        run_command(chat, "/tokens 16")
        with pytest.raises(ChatError, match="superseded"):
            next(stale)
        assert chat.cache_lengths() == []


def test_streamed_pieces_join_to_the_answer_and_the_cost_line(tiny):
    with session(tiny, max_new_tokens=8) as chat:
        pieces: list[str] = []
        answer = chat.ask(QUESTIONS[0], pieces.append)
        assert len(pieces) > 1 and "".join(pieces) == answer.text
        streamed = list(chat.stream(QUESTIONS[1]))
        assert "".join(streamed) == chat.last.text
    line = answer.cost.line()
    assert line.startswith("[kept 9/64 visual tokens | prefill ") and "KV cache " in line and "tokens/s]" in line
    assert answer.cost.cache_bytes > 0 and answer.cost.tokens_per_second > 0 and answer.cost.decode_tokens <= 7


def test_an_interrupted_answer_leaves_no_half_written_cache(tiny):
    _, model, _ = tiny
    with session(tiny) as chat:
        chat.ask(QUESTIONS[0])
        pieces = chat.stream(QUESTIONS[1])
        next(pieces)
        pieces.close()  # the reader stopped mid-answer (Ctrl-C, a closed page)
        assert chat.cache_lengths() == [] and not model._forward_pre_hooks
        assert chat.ask(QUESTIONS[1]).cost.prefill_tokens > SPEC.image_tokens  # a fresh conversation, image included

    class InterruptedOnce(io.StringIO):
        """Ctrl-C while the first answer is being printed."""

        interrupted = False

        def write(self, text: str) -> int:
            if not self.interrupted and self.getvalue().endswith("model> "):
                self.interrupted = True
                raise KeyboardInterrupt
            return super().write(text)

    out = InterruptedOnce()
    with session(tiny) as chat:
        assert chat_loop(chat, reader([QUESTIONS[0], QUESTIONS[1]]), out) == 0
    text = out.getvalue()
    assert "(answer interrupted; the conversation starts over" in text and text.count("[kept 9/64") == 1


def test_commands_change_settings_and_start_over(tiny):
    folder, model, _ = tiny
    with session(tiny) as chat:
        chat.ask(QUESTIONS[0])
        message = run_command(chat, "/tokens 16")
        assert "16 of 64" in message and "starts over" in message
        assert chat.tokens == 16 and chat.cache_lengths() == [] and not model._forward_pre_hooks
        assert chat.ask(QUESTIONS[0]).cost.kept == 16
        assert "fastv, 16 of 64" in run_command(chat, "/method fastv")
        assert "no compression" in run_command(chat, "/method none") and not chat.compressed
        assert chat.ask(QUESTIONS[0]).cost.kept == 64
        assert "starts over" in run_command(chat, f"/image {folder / 'scene.png'}")
        chat.ask(QUESTIONS[0])
        assert "reset" in run_command(chat, "/reset") and chat.cache_lengths() == []
        assert "/tokens" in run_command(chat, "/help")


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("/tokens 65", "budget of 65 visual tokens is larger than the image (64 visual tokens)"),
        ("/tokens many", "/tokens takes a whole number"),
        ("/tokens", "/tokens needs a value"),
        (
            "/method magic",
            "unknown method 'magic'; choose one of dart, dart_pre, divprune, fastv, pdrop, random, visionzip, none",
        ),
        ("/image missing.png", "image file not found: missing.png"),
        ("/image {folder}/notes.png", "notes.png is not an image in a format Pillow can read"),
        ("/frobnicate", "unknown command '/frobnicate'"),
    ],
)
def test_bad_commands_name_the_problem_and_keep_the_conversation(tiny, command, message):
    folder, _, _ = tiny
    with session(tiny) as chat:
        chat.ask(QUESTIONS[0])
        with pytest.raises(ChatError, match=re.escape(message)):
            run_command(chat, command.format(folder=folder))
        assert chat.tokens == 9 and chat.method == "dart" and chat.cache_lengths()  # nothing changed


def test_bad_session_inputs(tiny, tmp_path):
    folder, model, _ = tiny
    with pytest.raises(ChatError, match="image file not found"):
        session(tiny).set_image(tmp_path / "nowhere.png")
    with pytest.raises(ChatError, match=r"notes\.png is not an image"):
        open_image(folder / "notes.png")
    with pytest.raises(ChatError, match=r"over the upload limit of 1\.0 KiB"):
        open_image(folder / "scene.png", max_bytes=1024)
    with pytest.raises(ChatError, match="unknown method 'nope'"):
        session(tiny, method="nope")
    # the budget and the layer are the engine's to check: its messages, as a ChatError, before any turn
    with pytest.raises(ChatError, match="budget of 100 visual tokens is larger than the image"):
        session(tiny, tokens=100)
    with pytest.raises(ChatError, match="budget of 100 visual tokens is larger than the image"):
        session(tiny, method="none", tokens=100)
    with pytest.raises(ChatError, match="tokens must be a non-negative integer, got -1"):
        session(tiny, tokens=-1)
    with pytest.raises(ChatError, match=r"layer must be an integer in \[0, 3\]"):
        session(tiny, layer=4)
    assert not model._forward_pre_hooks and not model._forward_hooks  # the engine's trial left nothing attached
    with pytest.raises(ChatError, match="empty question"):
        session(tiny).stream("  ")


def test_only_common_raster_formats_are_decoded(tmp_path, monkeypatch):
    """An EPS upload must never reach Ghostscript (Pillow hands EPS to it): it is refused as not an image."""
    from PIL import EpsImagePlugin, Image

    calls = []

    def ghostscript(*args, **kwargs):
        calls.append(args)
        return Image.new("RGB", (8, 8)).im

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = tmp_path / "drawing.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n")
    with pytest.raises(ChatError, match=r"drawing\.eps is not an image in a format Pillow can read here \(PNG, JPEG"):
        open_image(eps)
    assert calls == []
    for name, format_ in (("photo.jpg", "JPEG"), ("photo.webp", "WEBP"), ("photo.gif", "GIF"), ("photo.bmp", "BMP")):
        Image.new("RGB", (8, 6), "red").save(tmp_path / name, format_)
        assert open_image(tmp_path / name).size == (8, 6)


def test_an_image_with_too_many_pixels_is_refused_before_decoding(tmp_path):
    """A few KiB of PNG can claim 90 megapixels (under the byte limit, under Pillow's own refusal at twice that)."""
    from PIL import Image

    Image.new("1", (10_000, 9_000)).save(tmp_path / "bomb.png")  # 1 bit per pixel: small to write, tiny on disk
    assert (tmp_path / "bomb.png").stat().st_size < 2**20
    with pytest.raises(ChatError, match=r"bomb\.png has too many pixels \(10000x9000, more than 89,478,485\)"):
        open_image(tmp_path / "bomb.png", max_bytes=2**20)


def test_chat_loop_prints_errors_and_goes_on(tiny):
    lines = ["", "/method magic", QUESTIONS[0], "/tokens 4", QUESTIONS[1], "/quit", "never read"]
    read = reader(lines)
    out = io.StringIO()
    with session(tiny) as chat:
        assert chat_loop(chat, read, out) == 0
    text = out.getvalue()
    assert "error: unknown method 'magic'" in text
    assert text.count("model> ") == 2 and "[kept 9/64" in text and "[kept 4/64" in text
    assert read("") == "never read"


def test_chat_command_with_piped_questions(tiny):
    folder, _, _ = tiny
    questions = f"{QUESTIONS[0]}\n{QUESTIONS[1]}\n/method fastv\n{QUESTIONS[0]}\n"  # ends without /quit: EOF
    command = ["chat", str(folder / "model"), "--image", str(folder / "scene.png"), "--tokens", "9"]
    result = subprocess.run(
        [sys.executable, "-m", "epic.cli", *command, "--max-new-tokens", "4"],
        input=questions,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("[kept 9/64 visual tokens") == 3 and "fastv, 9 of 64" in result.stdout
    assert "Traceback" not in result.stderr


def test_chat_command_refuses_bad_input_without_a_traceback(tiny, tmp_path, monkeypatch, capsys):
    folder, _, _ = tiny

    def refusal(argv: list[str]) -> str:
        assert main(argv) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert refusal(["chat", str(folder / "model"), "--image", str(tmp_path / "none.png")]).startswith(
        "epic chat: image file not found"
    )
    assert "larger than the image" in refusal(
        ["chat", str(folder / "model"), "--image", str(folder / "scene.png"), "--tokens", "100"]
    )
    assert "unknown template 'nope'; choose one of" in refusal(
        ["chat", str(folder / "model"), "--image", str(folder / "scene.png"), "--template", "nope"]
    )
    monkeypatch.chdir(tmp_path)  # no epic-demo/ here
    assert "run `epic demo` first" in refusal(["chat", "--image", str(folder / "scene.png")])
