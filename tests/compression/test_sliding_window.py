"""Sliding-window layers (Mistral, Qwen2 hybrids): the window counts original positions, not kept slots."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import epic
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava, tiny_llava_config
from tests.helpers import Row, at_slots, make_batch, reference_logits

WINDOW = 16


def mistral_with_window(attention: str):
    model = build_tiny_llava(TinyLlavaSpec(text_model="mistral"), attn_implementation=attention)
    model.config.text_config.sliding_window = WINDOW
    return model


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_window_counts_original_positions_in_a_forward(attention, padding_side):
    model = mistral_with_window(attention)
    spec = TinyLlavaSpec(text_model="mistral")
    batch = make_batch(spec, [Row(), Row(before=11, after=3)], padding_side)
    with torch.no_grad(), epic.compress(model, "fastv", tokens=8, layer=2) as state:
        out = model(**batch)
    reference = reference_logits(model, batch, state.kept, 2, window=WINDOW)
    real, expected = at_slots(reference, state.original_positions, batch["attention_mask"])
    torch.testing.assert_close(out.logits[real], expected[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_decoding_with_a_window_matches_the_reference(attention):
    """Every decoding step (shorter sliding cache, evictions) equals a full recomputation with the same kept set."""
    model = mistral_with_window(attention)
    spec = TinyLlavaSpec(text_model="mistral")
    batch = make_batch(spec, [Row(), Row(before=9)], "left", labels=False)
    new_tokens = 5
    with epic.compress(model, "dart", tokens=6, layer=2) as state:
        out = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    full = {
        "input_ids": out.sequences,
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones(2, new_tokens, dtype=torch.long)], dim=1),
        "pixel_values": batch["pixel_values"],
    }
    reference = reference_logits(model, full, state.kept, 2, window=WINDOW)
    prompt_length = batch["input_ids"].shape[1]
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, reference[:, prompt_length - 1 + step], atol=1e-4, rtol=0)


def qwen2_hybrid(window: int):
    spec = TinyLlavaSpec(text_model="qwen2")
    config = tiny_llava_config(spec, "sdpa")
    text = config.text_config
    text.use_sliding_window, text.sliding_window = True, window
    text.layer_types = ["full_attention", "full_attention", "sliding_attention", "full_attention"]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlavaForConditionalGeneration(config).eval(), spec


def test_hybrid_layers_after_k_generate_like_stock_at_full_budget():
    model, spec = qwen2_hybrid(window=4096)
    batch = make_batch(spec, [Row(), Row(before=11, after=3)], "left", labels=False)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    stock = model.generate(**batch, **kwargs)
    with epic.compress(model, "fastv", tokens=spec.image_tokens, layer=2):
        assert torch.equal(model.generate(**batch, **kwargs), stock)


def test_hybrid_layers_with_a_binding_window_match_the_reference():
    model, spec = qwen2_hybrid(window=WINDOW)
    batch = make_batch(spec, [Row(), Row(before=11, after=3)], "right")
    with torch.no_grad(), epic.compress(model, "dart", tokens=8, layer=2) as state:
        out = model(**batch)
    reference = reference_logits(model, batch, state.kept, 2, window=WINDOW, windowed_layers={2})
    real, expected = at_slots(reference, state.original_positions, batch["attention_mask"])
    torch.testing.assert_close(out.logits[real], expected[real], atol=1e-4, rtol=0)
    unwindowed = reference_logits(model, batch, state.kept, 2)
    assert not torch.allclose(
        out.logits[real], at_slots(unwindowed, state.original_positions, batch["attention_mask"])[1][real], atol=1e-3
    )
