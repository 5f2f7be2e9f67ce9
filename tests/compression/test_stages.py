"""Several pruning stages in one compression: each selects from what the one before kept, in a forward, in training
and in batched generation with a KV cache whose layer groups hold different lengths."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

import epic
from epic.compat import Layout, cache_length
from epic.compression import Budget, Stage, parse_stages
from epic.compression.methods.pdrop import PDrop
from epic.compression.stages import parse_later_stages, staged
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.helpers import Row, assert_matches_masked_reference, make_batch

SPEC = TinyLlavaSpec()
STAGED = [  # (method, stages): every method inside the LLM, and a first stage before it where the method can
    ("dart", "1:12,3:5"),
    ("fastv", "1:12,3:5"),
    ("divprune", "2:20,3:3"),
    ("random", "1:12,2:5"),
    ("pdrop", "1:12,2:6,3:3"),
    ("divprune", "0:12,2:5"),
    ("dart_pre", "0:12,3:6"),
    ("pdrop", "0:16,2:8"),
]
NEW_TOKENS = 4


def test_later_stages_drop_fractions_of_what_the_stage_before_kept():
    assert parse_later_stages("15:0.5, 24:0.25") == [(15, 0.5), (24, 0.25)]
    assert parse_later_stages("") == []
    stages = staged(2, 0.5, [(15, 0.5), (24, 0.25)])
    assert [stage.layer for stage in stages] == [2, 15, 24]
    assert [stage.budget.resolve(576) for stage in stages] == [288, 144, 108]  # 576/2, then /2, then *3/4
    for text in ("15", "15:1.0", "15:-0.1", "x:0.5", "15:half"):
        with pytest.raises(ValueError, match="write layer:fraction"):
            parse_later_stages(text)


def test_stages_parse_from_text_and_refuse_what_cannot_run():
    assert parse_stages("2:192, 15:64") == [Stage(2, Budget(tokens=192)), Stage(15, Budget(tokens=64))]
    assert parse_stages("2:0.5,15:0.875") == [Stage(2, Budget(ratio=0.5)), Stage(15, Budget(ratio=0.875))]
    for text, message in [
        ("2-192", "write layer:tokens"),
        ("x:3", "write layer:tokens"),
        ("2:many", "neither a token count nor a ratio"),
        ("2:1.5", "ratio must lie in"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_stages(text)
    model = build_tiny_llava()
    with pytest.raises(ValueError, match="strictly increasing layers; got layers \\[2, 2\\]"):
        epic.compress(model, "dart", stages="2:20,2:10")
    with pytest.raises(ValueError, match="must be an integer in \\[0, 3\\]"):
        epic.compress(model, "dart", stages="2:20,4:10")
    with pytest.raises(ValueError, match="must not keep more tokens than the stage before \\(layer 1: 10, layer 2: 20"):
        epic.compress(model, "dart", stages="1:10,2:20")
    with pytest.raises(ValueError, match="either stages= or layer="):
        epic.compress(model, "dart", stages="1:10,2:5", tokens=4)
    with pytest.raises(ValueError, match="cannot run before the LLM"):
        epic.compress(model, "fastv", stages="0:10,2:5")


def test_pdrop_builds_the_papers_pyramid_from_one_stage():
    """ratio=0.5 at layer 8 of a 32-layer LLM: 288 / 144 / 72 of 576 at layers 8 / 16 / 24 (the released scripts'
    `--layer_list [8,16,24] --image_token_ratio_list [0.5,0.25,0.125]`)."""
    stages = PDrop().schedule([Stage(8, Budget(ratio=0.5))], 32)
    assert [stage.layer for stage in stages] == [8, 16, 24]
    assert [stage.budget.resolve(576) for stage in stages] == [288, 144, 72]
    counted = PDrop(lam=0.25, drops=2).schedule([Stage(2, Budget(tokens=64))], 32)
    assert [(stage.layer, stage.budget.tokens) for stage in counted] == [(2, 64), (17, 16)]
    assert [stage.layer for stage in PDrop().schedule([Stage(2, Budget(tokens=8))], 4)] == [2, 3]  # as many as fit
    with pytest.raises(ValueError, match="pdrop's 3 drops from layer 2 need 3 decoder layers"):
        PDrop(drops=3).schedule([Stage(2, Budget(tokens=8))], 4)
    with epic.compress(build_tiny_llava(), "pdrop", tokens=12, layer=1) as state:
        assert [(stage.layer, stage.budget.tokens) for stage in state.stages] == [(1, 12), (2, 6), (3, 3)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(("method", "stages"), STAGED)
def test_each_stage_matches_a_masked_reference_and_selects_from_the_stage_before(family, padding_side, method, stages):
    model = build_tiny_llava(TinyLlavaSpec(text_model=family))
    batch = make_batch(SPEC, [Row(), Row(before=11, after=3, answer=6), Row(images=2, answer=1)], padding_side)
    with torch.no_grad(), epic.compress(model, method, stages=stages) as state:
        out = model(**batch)
    budgets = [stage.budget.tokens for stage in parse_stages(stages)]
    for stage_kept, budget in zip(state.stage_kept, budgets, strict=True):
        assert [kept.numel() for kept in stage_kept] == [budget, budget, 2 * budget]
    for earlier, later in pairwise(state.stage_kept):
        assert all(
            torch.isin(row_later, row_earlier).all() for row_earlier, row_later in zip(earlier, later, strict=True)
        )
    assert_matches_masked_reference(model, batch, state, out)


def generate(model, batch):
    return model.generate(
        **batch, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True
    )


@pytest.mark.parametrize(("method", "stages"), [entry for entry in STAGED if entry[0] != "random"])
def test_batched_generation_equals_per_row_and_each_layer_group_caches_its_stage(method, stages):
    model = build_tiny_llava()
    rows = [Row(), Row(before=12, after=2), Row(images=0, before=15)]
    batch = make_batch(SPEC, rows, "left", labels=False, seed=4)
    with epic.compress(model, method, stages=stages) as state:
        batched = generate(model, batch)
        batched_kept = [[kept.tolist() for kept in stage] for stage in state.stage_kept]
    length = batch["input_ids"].shape[1]
    cache = Layout.of(model).output_cache_of(batched)
    parsed = parse_stages(stages)
    starts = [stage.layer for stage in parsed] + [len(model.model.language_model.layers)]
    for layer in range(starts[0]):
        assert cache_length(cache, layer) == length + NEW_TOKENS - 1
    for stage, (start, end) in enumerate(pairwise(starts)):
        for layer in range(start, end):  # the longest row (the text-only one) sets the length
            assert cache_length(cache, layer) == length + NEW_TOKENS - 1, (stage, layer)
    image_rows = {"input_ids": batch["input_ids"][:2], "attention_mask": batch["attention_mask"][:2]}
    image_rows["pixel_values"] = batch["pixel_values"][:2]
    with epic.compress(model, method, stages=stages):
        only_images = generate(model, image_rows)
    cache = Layout.of(model).output_cache_of(only_images)
    for stage, (start, end) in enumerate(pairwise(starts)):
        kept_length = length - SPEC.image_tokens + parsed[stage].budget.tokens + NEW_TOKENS - 1
        assert [cache_length(cache, layer) for layer in range(start, end)] == [kept_length] * (end - start)
    for row in range(2):
        real = batch["attention_mask"][row].bool()
        single = {
            "input_ids": batch["input_ids"][row, real][None],
            "attention_mask": batch["attention_mask"][row, real][None],
            "pixel_values": batch["pixel_values"][row : row + 1],
        }
        with epic.compress(model, method, stages=stages) as state:
            alone = generate(model, single)
        pad = length - int(real.sum())
        assert alone.sequences[0, -NEW_TOKENS:].tolist() == batched.sequences[row, -NEW_TOKENS:].tolist()
        for stage, stage_kept in enumerate(state.stage_kept):
            assert [p + pad for p in stage_kept[0].tolist()] == batched_kept[stage][row]
        torch.testing.assert_close(alone.scores[-1][0], batched.scores[-1][row], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("method", "stages"), [("dart", "1:12,3:5"), ("pdrop", "1:12,2:6,3:3"), ("divprune", "0:12,2:5")]
)
def test_gradient_checkpointing_recomputes_every_stage_with_the_same_selection(method, stages):
    def gradients(checkpointing: dict | None) -> tuple[float, dict[str, torch.Tensor]]:
        model = build_tiny_llava(seed=1).train()
        if checkpointing is not None:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        batch = make_batch(SPEC, [Row(), Row(before=8, answer=5), Row(images=0)], "right")
        with epic.compress(model, method, stages=stages, seed=3):
            loss = model(**batch).loss
            loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    loss, plain = gradients(None)
    assert plain["model.multi_modal_projector.linear_1.weight"].abs().sum() > 0
    for kwargs in ({"use_reentrant": False}, {"use_reentrant": True}):
        checkpointed_loss, checkpointed = gradients(kwargs)
        assert checkpointed_loss == pytest.approx(loss, abs=1e-6)
        for name, grad in plain.items():
            torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4, msg=name)
