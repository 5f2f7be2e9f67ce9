"""The engine on stock LLaVA models: exactness, a masked-attention reference, padding, text-only rows."""

from __future__ import annotations

import pytest
import torch

import epic
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.helpers import Row, assert_matches_masked_reference, layer0_inputs, make_batch, method_stages

FAMILIES = ["llama", "qwen2", "mistral"]
ATTENTION = ["sdpa", "eager"]
STAGES = method_stages()
SPEC = TinyLlavaSpec()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize(("method", "layer"), [("dart", 2), ("divprune", 0)])
def test_full_budget_equals_stock_forward(family, attention, method, layer):
    model = build_tiny_llava(TinyLlavaSpec(text_model=family), attn_implementation=attention)
    for padding_side in ("right", "left"):
        batch = make_batch(SPEC, [Row(), Row(before=9, answer=5), Row(images=0)], padding_side)
        with torch.no_grad():
            stock = model(**batch)
            with epic.compress(model, method, tokens=SPEC.image_tokens, layer=layer):
                compressed = model(**batch)
        assert compressed.logits.shape == stock.logits.shape
        torch.testing.assert_close(compressed.logits, stock.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(compressed.loss, stock.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(("method", "layer"), STAGES)
def test_pruned_forward_matches_masked_reference(family, attention, padding_side, method, layer):
    model = build_tiny_llava(TinyLlavaSpec(text_model=family), attn_implementation=attention)
    batch = make_batch(SPEC, [Row(), Row(before=11, after=3, answer=6), Row(images=2, answer=1)], padding_side)
    with torch.no_grad(), epic.compress(model, method, tokens=9, layer=layer) as state, layer0_inputs(model) as seen:
        out = model(**batch)
    assert [kept.numel() for kept in state.stage_kept[0]] == [9, 9, 18]
    assert_matches_masked_reference(model, batch, state, out, seen["hidden"] if layer == 0 else None)


def test_sequence_shrinks_and_positions_keep_gaps():
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row(), Row(images=0)], "right")
    with torch.no_grad(), epic.compress(model, "fastv", tokens=8) as state:
        out = model(**batch)
    length = batch["input_ids"].shape[1]
    # the text-only row sets the compressed length; the image row is left-filled
    assert out.logits.shape[1] == length
    image_row = state.original_positions[0]
    real = image_row[image_row >= 0]
    assert real.numel() == length - SPEC.image_tokens + 8
    assert torch.all(real.diff() > 0)
    assert real[-1] == length - 1


@pytest.mark.parametrize(("method", "layer"), STAGES)
def test_text_only_row_in_mixed_batch_is_untouched(method, layer):
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row(), Row(images=0, before=30, answer=4)], "right")
    with torch.no_grad():
        stock = model(**batch).logits
        with epic.compress(model, method, tokens=4, layer=layer) as state:
            compressed = model(**batch).logits
    assert state.kept[1].numel() == 0
    assert torch.equal(state.original_positions[1], torch.arange(batch["input_ids"].shape[1]))
    torch.testing.assert_close(compressed[1], stock[1], atol=1e-5, rtol=0)


def test_ratio_means_round_of_kept_fraction():
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row()], labels=False)
    with torch.no_grad(), epic.compress(model, "random", ratio=0.889) as state:
        model(**batch)
    assert state.kept[0].numel() == round(SPEC.image_tokens * (1 - 0.889))


def test_block_restores_stock_model_and_saves_clean(tmp_path):
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row()], labels=False)
    stock_config = model.model.language_model.layers[1].self_attn.config

    def hooks():
        return [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()]

    with torch.no_grad():
        before = model(**batch).logits
        before_hooks = hooks()  # after a stock forward: transformers adds its own hooks lazily
        with epic.compress(model, "dart", tokens=4, layer=2):
            model(**batch)
        after = model(**batch).logits
    assert torch.equal(before, after)
    assert model.model.language_model.layers[1].self_attn.config is stock_config
    assert hooks() == before_hooks
    model.save_pretrained(tmp_path / "used")
    build_tiny_llava().save_pretrained(tmp_path / "fresh")
    assert (tmp_path / "used" / "config.json").read_text() == (tmp_path / "fresh" / "config.json").read_text()


def test_remove_handle_without_with_block():
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row()], labels=False)
    handle = epic.compress(model, "fastv", tokens=4)
    with torch.no_grad():
        assert model(**batch).logits.shape[1] < batch["input_ids"].shape[1]
        handle.remove()
        handle.remove()
        assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]


def test_several_images_each_keep_the_budget():
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row(images=3), Row(images=1)], labels=False)
    with torch.no_grad(), epic.compress(model, "dart", tokens=5) as state:
        model(**batch)
    image_token = model.config.image_token_id
    starts = (batch["input_ids"][0] == image_token).nonzero().squeeze(1).split(SPEC.image_tokens)
    for image in starts:
        assert torch.isin(state.kept[0], image).sum() == 5
    assert state.kept[1].numel() == 5


def test_last_prompt_token_is_kept_when_it_is_visual():
    """A row whose prompt ends on an image (caption pre-training) keeps the token that predicts the answer."""
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row(after=0, answer=4)])
    last_prompt = int((batch["labels"][0] != -100).int().argmax()) - 1
    with torch.no_grad(), epic.compress(model, "random", tokens=6) as state:
        model(**batch)
    assert last_prompt in state.kept[0].tolist()
    assert state.kept[0].numel() == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs a CUDA GPU")
def test_flash_attention_matches_sdpa():
    pytest.importorskip("flash_attn")
    spec = TinyLlavaSpec(hidden_size=128)
    batch = {k: v.cuda() for k, v in make_batch(spec, [Row(), Row(before=9)], "left").items()}
    outputs = {}
    for attention in ("sdpa", "flash_attention_2"):
        model = build_tiny_llava(spec, attn_implementation=attention, dtype=torch.bfloat16).cuda()
        with torch.no_grad(), epic.compress(model, "dart", tokens=9) as state:
            outputs[attention] = (model(**batch).logits.float(), state.kept)
    assert all(torch.equal(a, b) for a, b in zip(outputs["sdpa"][1], outputs["flash_attention_2"][1], strict=True))
    torch.testing.assert_close(outputs["sdpa"][0], outputs["flash_attention_2"][0], atol=5e-2, rtol=0)
