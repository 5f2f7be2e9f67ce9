"""Each template round-trips: labels cover exactly the replies, and the prompt is the training prefix."""

from __future__ import annotations

import pytest

from epic.data.encoding import encode_conversation, encode_prompt
from epic.data.templates import BUILTIN_TEMPLATES, Turn, get_template
from epic.labels import IGNORE_INDEX

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


def llama_style_tokenizer():
    """A BPE tokenizer laid out like Llama-2/Vicuna's legacy fast tokenizer: `▁` prepended, spaces as `▁`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sentences = [
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.",
        "USER: What color is the shape at the center? ASSISTANT: red",
        "USER: How many circles are there? ASSISTANT: 2",
    ] * 20
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<image>"])
    backend.train_from_iterator(sentences, trainer)
    backend.pre_tokenizer = None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def test_sentencepiece_style_tokens_match_whole_text_tokenization():
    tokenizer = llama_style_tokenizer()
    template = get_template("vicuna_v1")
    turns = [
        Turn("user", "What color is the shape at the center?"),
        Turn("assistant", "red"),
        Turn("user", "How many circles are there?"),
        Turn("assistant", "2"),
    ]
    encoded = encode_conversation(turns, template, tokenizer, image_token_id=3, image_tokens=4)
    text = "".join(part for part, _ in template.render(turns, "</s>"))
    assert encoded.input_ids == [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
    replies = [tokenizer.convert_ids_to_tokens(span) for span in supervised_spans(encoded.labels)]
    assert [tokens[0] for tokens in replies] == ["▁red", "▁2"] and all(tokens[-1] == "</s>" for tokens in replies)
    prompt = encode_prompt(turns[:3], template, tokenizer, 3, 4)
    assert prompt == encoded.input_ids[: len(prompt)]
    assert encoded.labels[len(prompt)] != -100 and encoded.labels[len(prompt) - 1] == -100


def test_vicuna_multi_turn_text_matches_llava():
    text = "".join(part for part, _ in get_template("vicuna_v1").render(CONVERSATION, "</s>"))
    assert "ASSISTANT: red</s>USER: How many circles are there? ASSISTANT: 2</s>" in text


def test_reply_stop_ids_end_where_the_template_closes_a_reply():
    from epic.data.shapes import SynthConfig, vocabulary_texts
    from epic.data.templates import reply_stop_ids
    from epic.models.factory import word_tokenizer

    tokenizer = word_tokenizer(vocabulary_texts(SynthConfig()))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert reply_stop_ids(get_template("chatml"), tokenizer) == {tokenizer.eos_token_id, im_end}
    assert reply_stop_ids(get_template("vicuna_v1"), tokenizer) == {tokenizer.eos_token_id}


def as_messages(turns: list[Turn], parts: bool) -> list[dict]:
    """transformers chat messages for `turns`: string content, or content parts (a leading `<image>\\n` becomes an
    image part, as a chat client sends it)."""
    if not parts:
        return [{"role": turn.role, "content": turn.text} for turn in turns]
    messages = []
    for turn in turns:
        image, text = turn.text.startswith("<image>\n"), turn.text.removeprefix("<image>\n")
        messages.append({"role": turn.role, "content": [{"type": "image"}] * image + [{"type": "text", "text": text}]})
    return messages


CONVERSATIONS = {
    "one turn, image": CONVERSATION[:2],
    "one turn, text only": [Turn("user", "How many circles are there?"), Turn("assistant", "2")],
    "two turns, image": CONVERSATION,
    "two turns, text only": [Turn("user", "How many circles are there?"), *CONVERSATION[1:]],
}


@pytest.mark.parametrize("parts", [False, True], ids=["string content", "content parts"])
@pytest.mark.parametrize(
    ("name", "conversation"),
    [(name, key) for name in sorted(BUILTIN_TEMPLATES) for key in CONVERSATIONS if name != "plain" or "one" in key],
)
def test_jinja_chat_template_renders_the_templates_own_text(tiny, name, conversation, parts):
    tokenizer = tiny[1].tokenizer
    template = get_template(name)
    turns = CONVERSATIONS[conversation]
    bos = tokenizer.bos_token if template.add_bos else ""
    jinja = lambda messages, cue: tokenizer.apply_chat_template(  # noqa: E731
        messages, chat_template=template.chat_template(), tokenize=False, add_generation_prompt=cue
    )
    whole = "".join(text for text, _ in template.render(turns, tokenizer.eos_token))
    assert jinja(as_messages(turns, parts), cue=False) == bos + whole
    prompt = "".join(text for text, _ in template.prompt(turns[:-1], tokenizer.eos_token))
    assert jinja(as_messages(turns[:-1], parts), cue=True) == bos + prompt


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml"])
def test_jinja_generation_blocks_mark_exactly_the_supervised_tokens(tiny, name):
    tokenizer = tiny[1].tokenizer
    template = get_template(name)
    encoded = encode_conversation(CONVERSATION, template, tokenizer, tiny[1].image_token_id, image_tokens=1)
    rendered = tokenizer.apply_chat_template(
        as_messages(CONVERSATION, parts=True),
        chat_template=template.chat_template(),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert rendered["input_ids"] == encoded.input_ids
    assert rendered["assistant_masks"] == [int(label != IGNORE_INDEX) for label in encoded.labels]


@pytest.mark.parametrize(
    ("name", "messages", "message"),
    [
        ("vicuna_v1", [{"role": "system", "content": "Be brief."}], "vicuna_v1: turns must alternate"),
        (
            "chatml",
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "chatml: turns must alternate",
        ),
        ("plain", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2, "one user turn"),
    ],
)
def test_jinja_chat_template_refuses_what_the_template_cannot_render(tiny, name, messages, message):
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match=message):
        tiny[1].tokenizer.apply_chat_template(
            messages, chat_template=get_template(name).chat_template(), tokenize=False
        )


def test_tokenizer_template_chat_template_is_the_tokenizers_own(tiny):
    tokenizer = tiny[1].tokenizer
    assert get_template("tokenizer", tokenizer).chat_template() == tokenizer.chat_template
