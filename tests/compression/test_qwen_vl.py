"""The engine on stock Qwen2-VL and Qwen2.5-VL (tiny, random weights): M-RoPE, images of different sizes in one
batch, per-image budgets, padding on either side, batched generation; and what it refuses on these families."""

from __future__ import annotations

import pytest
import torch

import epic
from epic.compat import IncompatibleTransformers, Layout
from epic.models.tiny import QWEN_VL_FAMILIES, build_tiny_qwen_vl
from tests.helpers import GridRow, at_slots, make_grid_batch, method_stages, reference_logits, staged_kept

# a row of one 4 x 4-patch image (4 tokens), one of two (6 and 8 tokens), a text-only row, one of 16 tokens
ROWS = [
    GridRow(),
    GridRow(grids=((6, 4), (4, 8)), before=9, answer=5),
    GridRow(grids=()),
    GridRow(grids=((8, 8),), after=3),
]
SIZES = [[4], [6, 8], [], [16]]
STAGES = [(name, layer) for name, layer in method_stages() if name != "visionzip"]  # every method, K = 2 and 0


@pytest.fixture(scope="module", params=QWEN_VL_FAMILIES)
def model(request):
    return build_tiny_qwen_vl(request.param, seed=1)


def prompt_only(batch: dict, row: int, rows: list[GridRow]) -> dict:
    """Row `row` of a left-padded batch alone, unpadded, with its own images."""
    real = batch["attention_mask"][row].bool()
    alone = {key: batch[key][row][real][None] for key in ("input_ids", "mm_token_type_ids")}
    alone["attention_mask"] = torch.ones_like(alone["input_ids"])
    first = sum(len(other.grids) for other in rows[:row])
    mine = list(range(first, first + len(rows[row].grids)))
    if mine:
        patches = batch["image_grid_thw"].prod(dim=-1).tolist()
        starts = [sum(patches[:index]) for index in range(len(patches))]
        alone["pixel_values"] = torch.cat([batch["pixel_values"][starts[i] : starts[i] + patches[i]] for i in mine])
        alone["image_grid_thw"] = batch["image_grid_thw"][mine]
    return alone


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_full_budget_equals_stock_forward(model, padding_side):
    batch = make_grid_batch(model, ROWS, padding_side)
    with torch.no_grad():
        stock = model(**batch)
        with epic.compress(model, "dart", ratio=0.0) as state:
            compressed = model(**batch)
    assert state.image_sizes == SIZES and state.tokens_per_image is None
    torch.testing.assert_close(compressed.logits, stock.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(compressed.loss, stock.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(("method", "layer"), STAGES)
def test_pruned_forward_matches_masked_reference_with_per_image_budgets(model, padding_side, method, layer):
    """Kept tokens keep their (t, h, w) rotary positions: the compressed forward equals the stock model (its own
    M-RoPE positions) with the dropped tokens masked out of attention from layer K on. Budgets are per image."""
    batch = make_grid_batch(model, ROWS, padding_side)
    with torch.no_grad(), epic.compress(model, method, ratio=0.5, layer=layer) as state:
        out = model(**batch)
    kept_first = [kept.numel() for kept in state.stage_kept[0]]
    assert kept_first == [sum(round(size * 0.5) for size in sizes) for sizes in SIZES]
    reference = reference_logits(model, batch, staged_kept(state))
    real, expected = at_slots(reference, state.original_positions, batch["attention_mask"])
    torch.testing.assert_close(out.logits[real], expected[real], atol=1e-4, rtol=0)


def test_an_exact_budget_is_capped_per_image_and_says_so(model):
    batch = make_grid_batch(model, ROWS, "right")
    with torch.no_grad(), epic.compress(model, "fastv", tokens=6) as state:
        with pytest.warns(UserWarning, match=r"tokens=6 is more than some images have \(4 visual tokens\)"):
            model(**batch)
        assert [kept.numel() for kept in state.kept] == [4, 12, 0, 6]


@pytest.mark.parametrize(("method", "layer"), [("dart", 2), ("fastv", 2), ("pdrop", 2), ("divprune", 0), ("pdrop", 0)])
def test_batched_generation_equals_per_row_and_continues_the_masked_reference(model, method, layer):
    """Left-padded batch of images of different sizes: each row generates what it generates alone, and the logits
    of every decoding step equal the stock model's on the whole sequence with the dropped tokens masked."""
    batch = make_grid_batch(model, ROWS, "left", labels=False)
    length = batch["input_ids"].shape[1]
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), epic.compress(model, method, ratio=0.5, layer=layer) as state:
        generated = model.generate(**batch, **settings, output_logits=True, return_dict_in_generate=True)
        kept = staged_kept(state)
        alone = [model.generate(**prompt_only(batch, row, ROWS), **settings) for row in range(len(ROWS))]
    new_tokens = generated.sequences[:, length:]
    for row, sequence in enumerate(alone):
        assert torch.equal(new_tokens[row], sequence[0, -new_tokens.shape[1] :]), row
    whole = dict(batch)
    whole["input_ids"] = generated.sequences
    whole["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(new_tokens)], dim=1)
    whole["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(new_tokens)], dim=1)
    reference = reference_logits(model, whole, kept)
    for step, logits in enumerate(generated.logits):
        torch.testing.assert_close(logits, reference[:, length - 1 + step], atol=1e-4, rtol=0)


def test_what_these_families_refuse(model):
    layout = Layout.of(model)
    batch = make_grid_batch(model, ROWS[:1], "right", labels=False)
    with torch.no_grad(), epic.compress(model, "divprune", tokens=4, layer=0):
        cache = layout.with_cache(layout.output_cache_of(model(**batch, use_cache=True)))
        mask = torch.ones(1, batch["input_ids"].shape[1] + 1, dtype=torch.long)
        with pytest.raises(ValueError, match=r"before the LLM needs position_ids \(generate passes them\)"):
            model(input_ids=batch["input_ids"][:, -1:], attention_mask=mask, use_cache=True, **cache)
    with pytest.raises(IncompatibleTransformers, match=r"has no `model\.vision_tower\.\.\.encoder\.layers`"):
        epic.compress(model, "visionzip", tokens=4)
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())  # none left
    batch["video_grid_thw"] = batch["image_grid_thw"]
    with epic.compress(model, "dart", ratio=0.5), pytest.raises(ValueError, match="video inputs are not supported"):
        model(**batch)


def test_an_unknown_family_is_refused_naming_what_is_missing():
    """LLaVA-NeXT (any-resolution tiles, newline tokens) is not supported yet: attaching says so, never a no-op."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from epic.models.tiny import TinyLlavaSpec, tiny_llava_config

    base = tiny_llava_config(TinyLlavaSpec())
    config = LlavaNextConfig(
        vision_config=base.vision_config.to_dict(),
        text_config=base.text_config.to_dict(),
        image_token_id=base.image_token_id,
        image_grid_pinpoints=[[48, 48]],
    )
    tiles = LlavaNextForConditionalGeneration(config)
    message = r"does not know the model family 'llava_next' \(LlavaNextForConditionalGeneration\): it needs where"
    with pytest.raises(ValueError, match=message):
        epic.compress(tiles, "dart", tokens=4)


@pytest.mark.parametrize(("method", "teacher"), [("dart", (0.25, 2)), ("fastv", (0.25, 3)), ("dart", None)])
def test_a_teacher_resumed_from_the_students_prefix_equals_its_own_forward(model, method, teacher):
    """TCD's two passes on M-RoPE: the teacher resumes from what entered the student's layer K (rotary included)."""
    from epic.compression import run_suffix
    from epic.distill import distilled_positions

    batch = make_grid_batch(model, ROWS, "right")
    wanted = distilled_positions(batch.pop("labels"))
    with torch.no_grad():
        if teacher is None:
            expected = model(**batch, logits_to_keep=wanted).logits
        else:
            with epic.compress(model, method, ratio=teacher[0], layer=teacher[1]):
                expected = model(**batch, logits_to_keep=wanted).logits
        with epic.compress(model, method, ratio=0.75, record_prefix=True, trim_last_layer=True) as student:
            model(**batch, logits_to_keep=wanted)
            handle = None if teacher is None else epic.compress(model, method, ratio=teacher[0], layer=teacher[1])
            with student.paused():
                rows = run_suffix(model, student.prefix, 2, wanted, handle)
            if handle is not None:
                handle.remove()
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("checkpointing", [{"use_reentrant": False}, {"use_reentrant": True}])
def test_gradient_checkpointing_recomputes_the_same_selection(checkpointing):
    def loss_and_gradients(kwargs: dict | None) -> tuple[float, dict[str, torch.Tensor]]:
        model = build_tiny_qwen_vl("qwen2_5_vl", seed=2).train()
        if kwargs is not None:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        batch = make_grid_batch(model, ROWS, "right")
        with epic.compress(model, "dart", ratio=0.5, seed=3):
            loss = model(**batch).loss
            loss.backward()
        return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    loss, plain = loss_and_gradients(None)
    checkpointed_loss, checkpointed = loss_and_gradients(checkpointing)
    assert checkpointed_loss == pytest.approx(loss, abs=1e-6)
    assert plain.keys() == checkpointed.keys() and any(".layers.3." in name for name in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4, msg=name)
