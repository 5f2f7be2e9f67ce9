"""Each template round-trips: labels cover exactly the replies, and the prompt is the training prefix."""

from __future__ import annotations

import pytest

from epic.data.encoding import IGNORE_INDEX, encode_conversation, encode_prompt
from epic.data.templates import Turn, get_template

CONVERSATION = [
    Turn("user", "<image>\nWhat color is the shape at the center?"),
    Turn("assistant", "red"),
    Turn("user", "How many circles are there?"),
    Turn("assistant", "2"),
]


def supervised_spans(labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml", "tokenizer"])
def test_labels_cover_exactly_the_replies(tiny, name):
    _, processor = tiny
    tokenizer = processor.tokenizer
    template = get_template(name, tokenizer)
    encoded = encode_conversation(CONVERSATION, template, tokenizer, processor.image_token_id, 64)
    assert len(encoded.input_ids) == len(encoded.labels)
    assert encoded.input_ids.count(processor.image_token_id) == 64
    spans = [tokenizer.decode(span) for span in supervised_spans(encoded.labels)]
    end = {"vicuna_v1": "</s>", "chatml": "<|im_end|>", "tokenizer": "<|im_end|>"}[name]
    assert spans == [f"red {end}", f"2 {end}"]
    for label, token in zip(encoded.labels, encoded.input_ids, strict=True):
        assert label in (IGNORE_INDEX, token)


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml", "tokenizer", "plain"])
def test_prompt_is_the_training_prefix(tiny, name):
    _, processor = tiny
    tokenizer = processor.tokenizer
    template = get_template(name, tokenizer)
    turns = CONVERSATION[:2] if name == "plain" else CONVERSATION
    encoded = encode_conversation(turns, template, tokenizer, processor.image_token_id, 64)
    last_reply = max(
        i
        for i, label in enumerate(encoded.labels)
        if label == IGNORE_INDEX and i + 1 < len(encoded.labels) and encoded.labels[i + 1] != IGNORE_INDEX
    )
    prompt = encode_prompt(turns[:-1], template, tokenizer, processor.image_token_id, 64)
    assert prompt == encoded.input_ids[: last_reply + 1]


def test_plain_template_is_image_then_caption(tiny):
    _, processor = tiny
    template = get_template("plain")
    turns = [Turn("user", "<image>"), Turn("assistant", "There is a red circle at the center .")]
    encoded = encode_conversation(turns, template, processor.tokenizer, processor.image_token_id, 5)
    bos = processor.tokenizer.bos_token_id
    assert encoded.input_ids[:6] == [bos] + [processor.image_token_id] * 5
    assert processor.tokenizer.decode(supervised_spans(encoded.labels)[0]) == "There is a red circle at the center ."


def test_vicuna_text_matches_llava(tiny):
    template = get_template("vicuna_v1")
    text = "".join(part for part, _ in template.render(CONVERSATION[:2], "</s>"))
    assert text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat color is the shape at the "
        "center? ASSISTANT: red</s>"
    )


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([], "empty conversation"),
        ([Turn("assistant", "hi")], "must alternate"),
        ([Turn("user", "a"), Turn("user", "b")], "must alternate"),
    ],
)
def test_bad_conversations(turns, message):
    with pytest.raises(ValueError, match=message):
        get_template("vicuna_v1").render(turns, "</s>")


def test_unknown_template_and_missing_chat_template():
    with pytest.raises(ValueError, match="unknown template 'alpaca'"):
        get_template("alpaca")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        get_template("tokenizer", object())
