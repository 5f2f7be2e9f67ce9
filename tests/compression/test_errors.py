"""Bad input fails loudly, naming the offending value."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import epic
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.helpers import Row, make_batch

SPEC = TinyLlavaSpec()


@pytest.fixture(scope="module")
def model():
    return build_tiny_llava()


def test_budget_larger_than_image(model):
    with pytest.raises(ValueError, match=r"budget of 65 visual tokens is larger than the image \(64"):
        epic.compress(model, "dart", tokens=65)


@pytest.mark.parametrize("layer", [4, -1, 2.0])
def test_bad_layer(model, layer):
    with pytest.raises(ValueError, match=rf"compression layer must be an integer in \[0, 3\].*{layer!r}"):
        epic.compress(model, "dart", tokens=4, layer=layer)


@pytest.mark.parametrize("method", ["dart", "fastv"])
def test_a_method_that_scores_with_attention_cannot_run_before_the_llm(model, method):
    before_llm = r"'dart_pre', 'divprune', 'pdrop', 'random'"
    with pytest.raises(ValueError, match=r"cannot run before the LLM \(layer=0\).*" + before_llm):
        epic.compress(model, method, tokens=4, layer=0)


def test_unknown_method(model):
    with pytest.raises(ValueError, match=r"unknown compression method 'pdropx'.*'dart'"):
        epic.compress(model, "pdropx", tokens=4)


def test_unknown_option(model):
    with pytest.raises(ValueError, match=r"'fastv' has no option\(s\) \['pivots_image'\]"):
        epic.compress(model, "fastv", tokens=4, pivots_image=3)


@pytest.mark.parametrize(("tokens", "ratio"), [(None, None), (4, 0.5), (None, 1.0), (-1, None)])
def test_bad_budget(model, tokens, ratio):
    with pytest.raises(ValueError, match=r"tokens|ratio"):
        epic.compress(model, "dart", tokens=tokens, ratio=ratio)


def test_not_a_llava_model():
    text_model = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    )
    with pytest.raises(TypeError, match=r"LLaVA-family model.*LlamaForCausalLM"):
        epic.compress(text_model, "dart", tokens=4)


def test_wrong_image_token_count(model):
    batch = make_batch(SPEC, [Row(), Row()], labels=False)
    batch["input_ids"][1, 5] = 7  # one image token overwritten with text
    with pytest.raises(ValueError, match="image-token count does not match"), epic.compress(model, "dart", tokens=4):
        model(**batch)


def test_image_tokens_without_pixels(model):
    batch = make_batch(SPEC, [Row()], labels=False)
    del batch["pixel_values"]
    with pytest.raises(ValueError, match="neither pixel_values"), epic.compress(model, "dart", tokens=4):
        model(**batch)


def test_missing_input_ids(model):
    batch = make_batch(SPEC, [Row()], labels=False)
    embeds = model.get_input_embeddings()(batch.pop("input_ids"))
    with pytest.raises(ValueError, match="needs input_ids"), epic.compress(model, "dart", tokens=4):
        model(inputs_embeds=embeds, **batch)


def test_no_state_leaks_from_a_failed_forward(model):
    batch = make_batch(SPEC, [Row()], labels=False)
    with torch.no_grad():
        stock = model(**batch).logits
        with epic.compress(model, "dart", tokens=4) as state:
            bad = dict(batch, pixel_values=None)
            with pytest.raises(ValueError):
                model(**bad)
            assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1] - 60
        assert state.kept[0].numel() == 4
        assert torch.equal(model(**batch).logits, stock)


def test_inner_language_model_called_directly_fails(model):
    batch = make_batch(SPEC, [Row()], labels=False)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with (
        pytest.raises(RuntimeError, match="outside a forward of the LLaVA model"),
        epic.compress(model, "dart", tokens=4),
    ):
        model.model.language_model(inputs_embeds=embeds)


def test_a_method_returning_bad_positions_is_caught(model):
    from dataclasses import dataclass

    from epic.compression import ImageSelection

    @dataclass
    class Repeats:
        needs_features = False

        def select(self, image: ImageSelection) -> torch.Tensor:
            return image.positions[:1].repeat(image.budget)

    batch = make_batch(SPEC, [Row()], labels=False)
    with (
        pytest.raises(RuntimeError, match="Repeats returned repeated positions"),
        epic.compress(model, Repeats(), tokens=4),
    ):
        model(**batch)
