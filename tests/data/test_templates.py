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
