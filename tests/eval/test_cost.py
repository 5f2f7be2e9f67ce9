"""Cost formulas against SPEC numbers, torch's FLOP counter and the real KV cache."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import epic
from epic.compat import Layout
from epic.eval.cost import DecoderShape, kv_cache_bytes, layer_macs, measured_cache_bytes, prefill_macs
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.helpers import Row, make_batch

LLAVA_7B = DecoderShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128)
SPEC = TinyLlavaSpec()


def test_llava_7b_kv_cache_matches_spec():
    mib = 2**20
    assert kv_cache_bytes(LLAVA_7B, 1) == 0.5 * mib
    assert kv_cache_bytes(LLAVA_7B, 576) == 288 * mib
    assert kv_cache_bytes(LLAVA_7B, 576, 64, layer=2) == 48 * mib


def test_layer_macs_follow_fastv_convention():
    n, d, m = 100, 4096, 11008
    assert layer_macs(LLAVA_7B, n) == 4 * n * d**2 + 2 * n**2 * d + 3 * n * d * m
    plain = DecoderShape(layers=1, hidden=d, intermediate=m, heads=32, kv_heads=32, head_dim=128, gated_mlp=False)
    assert layer_macs(plain, n) == 4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m
    assert prefill_macs(LLAVA_7B, n, 40, layer=2) == 2 * layer_macs(LLAVA_7B, n) + 30 * layer_macs(LLAVA_7B, 40)


def decoder_flops(model, batch) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**batch)
    counts = counter.get_flop_counts()
    return sum(counts[f"{type(model).__name__}.model.language_model"].values())


@pytest.mark.parametrize("tokens", [None, 8])
def test_formula_matches_flop_counter(tokens):
    """Eager attention makes every matmul visible to the counter, which counts 2 FLOPs per MAC."""
    model = build_tiny_llava(SPEC, attn_implementation="eager")
    batch = make_batch(SPEC, [Row()], labels=False)
    length = batch["input_ids"].shape[1]
    shape = DecoderShape.from_config(model.config)
    if tokens is None:
        assert decoder_flops(model, batch) == 2 * prefill_macs(shape, length)
        return
    with epic.compress(model, "dart", tokens=tokens, layer=2):
        measured = decoder_flops(model, batch)
    expected = 2 * prefill_macs(shape, length, length - SPEC.image_tokens + tokens, layer=2)
    assert expected <= measured <= expected * 1.01  # the remainder is scoring (one attention row, DART's pivots)


def test_measured_cache_equals_formula():
    model = build_tiny_llava(SPEC)
    batch = make_batch(SPEC, [Row(), Row(before=7)], "left", labels=False)
    length = batch["input_ids"].shape[1]
    shape = DecoderShape.from_config(model.config)
    layout = Layout.of(model)
    with torch.no_grad():
        full = layout.output_cache_of(model(**batch, use_cache=True))
        with epic.compress(model, "fastv", tokens=10, layer=2):
            compressed = layout.output_cache_of(model(**batch, use_cache=True))
    assert measured_cache_bytes(full) == 2 * kv_cache_bytes(shape, length, bytes_per_value=4)
    kept_length = length - SPEC.image_tokens + 10
    assert measured_cache_bytes(compressed) == 2 * kv_cache_bytes(shape, length, kept_length, 2, bytes_per_value=4)


def test_staged_formulas_match_the_flop_counter_and_the_cache():
    """Two stages (12 tokens from layer 1, 5 of them from layer 3): each layer group counted at its own length."""
    model = build_tiny_llava(SPEC, attn_implementation="eager")
    batch = make_batch(SPEC, [Row()], labels=False)
    length = batch["input_ids"].shape[1]
    shape = DecoderShape.from_config(model.config)
    stages = [(1, length - SPEC.image_tokens + 12), (3, length - SPEC.image_tokens + 5)]
    expected = 2 * prefill_macs(shape, length, stages=stages)
    assert expected == 2 * (
        layer_macs(shape, length) + 2 * layer_macs(shape, stages[0][1]) + layer_macs(shape, stages[1][1])
    )
    with epic.compress(model, "fastv", stages="1:12,3:5"):
        measured = decoder_flops(model, batch)
        cache = Layout.of(model).output_cache_of(model(**batch, use_cache=True))
    assert expected <= measured <= expected * 1.01
    assert measured_cache_bytes(cache) == kv_cache_bytes(shape, length, bytes_per_value=4, stages=stages)
