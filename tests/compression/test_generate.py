"""Generation with a KV cache: prefill prunes once, decoding continues at the original positions."""

from __future__ import annotations

import pytest
import torch

import epic
from epic.compat import Layout, cache_length
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.helpers import Row, make_batch, method_stages

SPEC = TinyLlavaSpec()
NEW_TOKENS = 6


def generate(model, batch, **kwargs):
    return model.generate(
        **batch,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        min_new_tokens=NEW_TOKENS,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=0,
        **kwargs,
    )


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_full_budget_generate_equals_stock(family, attention):
    model = build_tiny_llava(TinyLlavaSpec(text_model=family), attn_implementation=attention)
    batch = make_batch(SPEC, [Row(), Row(before=9), Row(images=0, before=20)], "left", labels=False)
    stock = generate(model, batch)
    with epic.compress(model, "dart", tokens=SPEC.image_tokens):
        compressed = generate(model, batch)
    assert torch.equal(compressed.sequences, stock.sequences)
    for ours, theirs in zip(compressed.scores, stock.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize(("method", "layer"), method_stages(exclude=("random",)))  # random draws across rows
def test_batched_generation_equals_per_row(family, method, layer):
    model = build_tiny_llava(TinyLlavaSpec(text_model=family))
    rows = [Row(), Row(before=12, after=2), Row(images=2, before=2), Row(images=0, before=15)]
    batch = make_batch(SPEC, rows, "left", labels=False, seed=4)
    with epic.compress(model, method, tokens=7, layer=layer) as state:
        batched = generate(model, batch)
        batched_kept = [k.tolist() for k in state.kept]
    length = batch["input_ids"].shape[1]
    image_offset = 0
    for row in range(len(rows)):
        real = batch["attention_mask"][row].bool()
        single = {
            "input_ids": batch["input_ids"][row, real][None],
            "attention_mask": batch["attention_mask"][row, real][None],
        }
        if rows[row].images:
            single["pixel_values"] = batch["pixel_values"][image_offset : image_offset + rows[row].images]
        image_offset += rows[row].images
        with epic.compress(model, method, tokens=7, layer=layer) as state:
            alone = generate(model, single)
        pad = length - int(real.sum())
        assert alone.sequences[0, -NEW_TOKENS:].tolist() == batched.sequences[row, -NEW_TOKENS:].tolist()
        assert [p + pad for p in state.kept[0].tolist()] == batched_kept[row]
        torch.testing.assert_close(alone.scores[-1][0], batched.scores[-1][row], atol=1e-4, rtol=0)


def test_compressed_layers_hold_a_shorter_cache():
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row(), Row(before=9)], "left", labels=False)
    layer, tokens = 2, 5
    with epic.compress(model, "fastv", tokens=tokens, layer=layer) as state:
        out = generate(model, batch)
    cache = Layout.of(model).output_cache_of(out)
    length = batch["input_ids"].shape[1]
    full = length + NEW_TOKENS - 1
    compressed = length - SPEC.image_tokens + tokens + NEW_TOKENS - 1
    assert cache_length(cache, 0) == cache_length(cache, layer - 1) == full
    for index in range(layer, SPEC.num_layers):
        assert cache_length(cache, index) == compressed
    assert state.original_positions.shape == (2, length - SPEC.image_tokens + tokens)


def test_decoding_a_foreign_cache_fails_loudly():
    model = build_tiny_llava()
    layout = Layout.of(model)
    batch = make_batch(SPEC, [Row()], "left", labels=False)
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
    next_token = prefill.logits[:, -1:].argmax(-1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(next_token)], dim=1)
    with (
        pytest.raises(ValueError, match="not filled by a prefill under this compression"),
        epic.compress(model, "dart", tokens=4),
        torch.no_grad(),
    ):
        model(input_ids=next_token, attention_mask=mask, **layout.with_cache(layout.output_cache_of(prefill)))


def test_manual_decoding_loop_matches_generate():
    """Prefill and step-by-step decoding by hand give the tokens `generate` gives."""
    model = build_tiny_llava()
    layout = Layout.of(model)
    batch = make_batch(SPEC, [Row(), Row(before=9)], "left", labels=False)
    with epic.compress(model, "dart", tokens=6), torch.no_grad():
        reference = generate(model, batch).sequences[:, -NEW_TOKENS:]
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(**batch, position_ids=positions, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(NEW_TOKENS - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=tokens[-1][:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **layout.with_cache(layout.output_cache_of(out)),
            )
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(tokens, dim=1), reference)


def test_decoding_before_the_llm_continues_from_the_unpruned_length():
    """At layer 0 every layer's cache is short; a step without position ids or mask still gets the position it
    has in the uncompressed sequence (the stock model would count the shorter cache): the loop's logits equal
    generate's at every step."""
    model = build_tiny_llava()
    layout = Layout.of(model)
    batch = make_batch(SPEC, [Row()], labels=False)
    with epic.compress(model, "divprune", tokens=6, layer=0), torch.no_grad():
        reference = generate(model, batch)
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], use_cache=True)
        steps = [out.logits[:, -1]]
        for token in reference.sequences[0, -NEW_TOKENS:-1]:
            cache = layout.with_cache(layout.output_cache_of(out))
            out = model(input_ids=token.view(1, 1), use_cache=True, **cache)
            steps.append(out.logits[:, -1])
        cache = layout.output_cache_of(out)
        assert cache_length(cache, 0) == batch["input_ids"].shape[1] - SPEC.image_tokens + 6 + NEW_TOKENS - 1
    for ours, theirs in zip(steps, reference.scores, strict=True):
        allowed = theirs.isfinite()  # min_new_tokens sets the end-of-sequence score to -inf
        torch.testing.assert_close(ours[allowed], theirs[allowed], atol=1e-5, rtol=0)
