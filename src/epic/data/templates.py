"""Conversation templates: how a list of turns becomes text, and which parts of it are supervised.

A template renders a conversation into segments `(text, supervised)`; only assistant replies (with their end-of-turn
marker) are supervised. `prompt()` renders the same conversation up to the point where the assistant speaks next,
exactly as training saw it, so evaluation and training cannot disagree on the format.

Templates: `vicuna_v1` (LLaVA-1.5), `plain` (caption pre-training), `chatml` (Qwen), and `tokenizer` (the
tokenizer's own `chat_template`). `chat_template()` gives each as a Jinja chat template (the transformers convention,
what a saved processor carries) that renders the same text: string content as is, and list content with one
`<image>\n` per image part, then the text parts joined by a space (as epic writes `<image>\nquestion`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str


Segment = tuple[str, bool]  # (text, supervised)


class Template(Protocol):
    name: str
    add_bos: bool

    def render(self, turns: list[Turn], eos: str) -> list[Segment]:
        """The whole conversation; assistant replies are supervised."""
        ...

    def prompt(self, turns: list[Turn], eos: str) -> list[Segment]:
        """The conversation (ending on a user turn) and the cue for the reply: the same segments training saw."""
        ...

    def chat_template(self) -> str:
        """The same template in Jinja, for `apply_chat_template` (`add_generation_prompt` gives `prompt()`)."""
        ...


def _say(text: str) -> str:
    """Jinja that prints `text` literally."""
    return "{{ " + json.dumps(text) + " }}"


_CONTENT = (  # a message's content as epic writes a turn's text
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}" + _say(f"{IMAGE_PLACEHOLDER}\n") + "{% endfor %}"
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}{% endif %}"
)


def _jinja(name: str, opening: str, user: str, cue: str, reply: str, after_reply: str = "") -> str:
    """A Jinja chat template: `opening`, then each user turn as `user` and each reply as `cue`, `reply` (in a
    `generation` block: the supervised part) and `after_reply`; the generation prompt is `cue`."""
    alternation = (
        "{% if message['role'] != ['user', 'assistant'][loop.index0 % 2] %}{{ raise_exception("
        + json.dumps(f"template {name}: turns must alternate user/assistant from a user, no system turn")
        + ") }}{% endif %}"
    )
    generation_prompt = f"{{% if add_generation_prompt %}}{cue}{{% endif %}}" if cue else ""
    return (
        f"{opening}{{% for message in messages %}}{alternation}{{% if message['role'] == 'user' %}}{user}{{% else %}}"
        f"{cue}{{% generation %}}{reply}{{% endgeneration %}}{after_reply}{{% endif %}}{{% endfor %}}"
        + generation_prompt
    )


def _check_alternation(turns: list[Turn], ends_with_user: bool) -> None:
    if not turns:
        raise ValueError("empty conversation")
    for index, turn in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ValueError(f"turn {index} is from {turn.role!r}; turns must alternate user/assistant from a user")
    if ends_with_user and turns[-1].role != "user":
        raise ValueError("a prompt must end with a user turn")


@dataclass(frozen=True)
class VicunaV1:
    """LLaVA-1.5 (`SeparatorStyle.TWO`): `SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>`; each reply
    (with the space before it) and its `</s>` are supervised."""

    name: str = "vicuna_v1"
    add_bos: bool = True
    system: str = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )

    def render(self, turns: list[Turn], eos: str) -> list[Segment]:
        _check_alternation(turns, ends_with_user=False)
        segments: list[Segment] = [(f"{self.system} ", False)]
        for turn in turns:
            if turn.role == "user":
                segments.append((f"USER: {turn.text} ASSISTANT:", False))
            else:
                segments.append((f" {turn.text}{eos}", True))
        return segments

    def prompt(self, turns: list[Turn], eos: str) -> list[Segment]:
        _check_alternation(turns, ends_with_user=True)
        return self.render(turns, eos)

    def chat_template(self) -> str:
        opening = "{{ bos_token }}" + _say(f"{self.system} ")
        reply = _say(" ") + _CONTENT + "{{ eos_token }}"
        return _jinja(self.name, opening, _say("USER: ") + _CONTENT, _say(" ASSISTANT:"), reply)


@dataclass(frozen=True)
class Plain:
    """Caption pre-training (LLaVA "plain"): the image tokens, then the caption and a newline (supervised)."""

    name: str = "plain"
    add_bos: bool = True

    def render(self, turns: list[Turn], eos: str) -> list[Segment]:
        _check_alternation(turns, ends_with_user=False)
        if len(turns) != 2:
            raise ValueError(f"the plain template takes one user turn and one reply, got {len(turns)} turns")
        images = turns[0].text.count(IMAGE_PLACEHOLDER)
        return [(IMAGE_PLACEHOLDER * images, False), (f"{turns[1].text}\n", True)]

    def prompt(self, turns: list[Turn], eos: str) -> list[Segment]:
        _check_alternation(turns, ends_with_user=True)
        if len(turns) != 1:
            raise ValueError(f"the plain template takes one user turn, got {len(turns)} turns")
        return [(IMAGE_PLACEHOLDER * turns[0].text.count(IMAGE_PLACEHOLDER), False)]

    def chat_template(self) -> str:
        placeholder = json.dumps(IMAGE_PLACEHOLDER)
        images = (
            f"{{{{ {placeholder} * (message['content'].count({placeholder}) if message['content'] is string else "
            "message['content'] | selectattr('type', 'equalto', 'image') | list | length) }}"
        )
        opening = (
            "{% if messages | length > 2 %}{{ raise_exception("
            + json.dumps("template plain: one user turn and at most one reply")
            + ") }}{% endif %}{{ bos_token }}"
        )
        return _jinja(self.name, opening, images, "", _CONTENT + _say("\n"))


@dataclass(frozen=True)
class ChatML:
    """Qwen's ChatML: `<|im_start|>role\\n...<|im_end|>\\n`; the reply and its `<|im_end|>` are supervised."""

    name: str = "chatml"
    add_bos: bool = False
    system: str = "You are a helpful assistant."

    def render(self, turns: list[Turn], eos: str) -> list[Segment]:
        _check_alternation(turns, ends_with_user=False)
        segments: list[Segment] = [(f"<|im_start|>system\n{self.system}<|im_end|>\n", False)]
        for turn in turns:
            if turn.role == "user":
                segments.append((f"<|im_start|>user\n{turn.text}<|im_end|>\n<|im_start|>assistant\n", False))
            else:
                segments += [(f"{turn.text}<|im_end|>", True), ("\n", False)]
        return segments

    def prompt(self, turns: list[Turn], eos: str) -> list[Segment]:
        _check_alternation(turns, ends_with_user=True)
        return self.render(turns, eos)

    def chat_template(self) -> str:
        opening = _say(f"<|im_start|>system\n{self.system}<|im_end|>\n")
        user = _say("<|im_start|>user\n") + _CONTENT + _say("<|im_end|>\n")
        reply = _CONTENT + _say("<|im_end|>")
        return _jinja(self.name, opening, user, _say("<|im_start|>assistant\n"), reply, _say("\n"))


@dataclass(frozen=True)
class TokenizerTemplate:
    """The tokenizer's own `chat_template`, split into segments by rendering growing prefixes of the chat."""

    tokenizer: object
    name: str = "tokenizer"
    add_bos: bool = False

    def _render(self, turns: list[Turn], generation_prompt: bool) -> str:
        messages = [{"role": turn.role, "content": turn.text} for turn in turns]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _segments(self, turns: list[Turn]) -> tuple[list[Segment], str]:
        """Segments of every completed reply, and the text rendered so far."""
        segments: list[Segment] = []
        rendered = ""
        for index, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            cue = self._render(turns[:index], generation_prompt=True)
            with_reply = self._render(turns[: index + 1], generation_prompt=False)
            if not cue.startswith(rendered) or not with_reply.startswith(cue):
                raise ValueError("the tokenizer's chat_template does not render conversations prefix by prefix")
            segments += [(cue[len(rendered) :], False), (with_reply[len(cue) :], True)]
            rendered = with_reply
        return segments, rendered

    def render(self, turns: list[Turn], eos: str) -> list[Segment]:
        _check_alternation(turns, ends_with_user=False)
        segments, rendered = self._segments(turns)
        full = self._render(turns, generation_prompt=False)
        if not full.startswith(rendered):
            raise ValueError("the tokenizer's chat_template does not render conversations prefix by prefix")
        segments.append((full[len(rendered) :], False))
        return [segment for segment in segments if segment[0]]

    def prompt(self, turns: list[Turn], eos: str) -> list[Segment]:
        _check_alternation(turns, ends_with_user=True)
        segments, rendered = self._segments(turns)
        cue = self._render(turns, generation_prompt=True)
        if not cue.startswith(rendered):
            raise ValueError("the tokenizer's chat_template does not render conversations prefix by prefix")
        segments.append((cue[len(rendered) :], False))
        return [(text, False) for text, _ in segments if text]

    def chat_template(self) -> str:
        return self.tokenizer.chat_template


BUILTIN_TEMPLATES = {"vicuna_v1": VicunaV1(), "plain": Plain(), "chatml": ChatML()}


def get_template(name: str, tokenizer: object | None = None) -> Template:
    """The template called `name`; `tokenizer` uses the tokenizer's own chat_template (it must have one)."""
    if name == "tokenizer":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'tokenizer' needs a tokenizer with a chat_template")
        return TokenizerTemplate(tokenizer)
    if name not in BUILTIN_TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {[*sorted(BUILTIN_TEMPLATES), 'tokenizer']}")
    return BUILTIN_TEMPLATES[name]


REPLY_SENTINEL = "\x00epic-reply\x00"  # stands for a reply when finding what a template writes around one


def reply_stop_ids(template: Template, tokenizer) -> set[int]:
    """Ids that end a generated reply: the tokenizer's end of sequence and the special token the template closes a
    reply with (`<|im_end|>` for ChatML), so generation stops where the template's reply ends."""
    stop = {tokenizer.eos_token_id}
    try:
        segments = template.render([Turn("user", "q"), Turn("assistant", REPLY_SENTINEL)], tokenizer.eos_token or "")
    except ValueError:  # a template without replies of its own shape
        segments = []
    closing = "".join(text for text, _ in segments).partition(REPLY_SENTINEL)[2]
    if closing:
        first = tokenizer(closing, add_special_tokens=False)["input_ids"][:1]
        stop |= set(first) & set(tokenizer.all_special_ids)
    return {token for token in stop if token is not None}
