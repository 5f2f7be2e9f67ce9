"""Planning without hooks: scoring equals the attention row, selection keeps the budget and the last prompt token,
the gather plan left-fills kept tokens in input order, and masks/slots follow it."""

from __future__ import annotations

import pytest
import torch

from epic.compression.batch import read_layout
from epic.compression.budget import Budget
from epic.compression.methods.fastv import FastV
from epic.compression.planning import Scores, decode_plan, gather_plan, score_prompt, select_kept, wanted_slots


def test_scores_are_the_last_prompt_tokens_attention_row_over_the_prompt():
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, head_dim = 2, 4, 2, 7, 8
    query = torch.randn(batch, heads, length, head_dim, generator=generator)
    key = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    real = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]]).bool()
    last = torch.tensor([4, 6])
    scores = score_prompt(query, key, 0.5, last, real)
    for row in range(batch):
        keys = key[row].repeat_interleave(heads // kv_heads, dim=0)  # [H, L, hd]
        logits = (query[row, :, last[row]][:, None, :] * keys).sum(-1) * 0.5  # [H, L]
        allowed = real[row] & (torch.arange(length) <= last[row])
        expected = logits.masked_fill(~allowed, float("-inf")).softmax(-1).mean(0)
        torch.testing.assert_close(scores.attention[row], expected)
        assert float(scores.attention[row][~allowed].abs().sum()) == 0.0
    torch.testing.assert_close(scores.key_norms, key.abs().sum(dim=(1, 3)))


def test_selection_keeps_each_images_budget_and_never_drops_the_last_prompt_token():
    image_mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]).bool()  # row 1 ends with its image
    valid = torch.ones_like(image_mask)
    layout = read_layout(image_mask, valid, [4, 4], prompt_end=torch.tensor([6, 6]))
    attention = torch.tensor([[0.0, 0.1, 0.4, 0.3, 0.2, 0.0], [0.0, 0.0, 0.5, 0.4, 0.1, 0.0]])
    scores = Scores(attention=attention, key_norms=torch.ones(2, 6))
    keep, kept, _ = select_kept(FastV(), Budget(tokens=2), layout, scores, None, torch.Generator(), torch.device("cpu"))
    assert [[image.tolist() for image in row] for row in kept] == [[[2, 3]], [[5, 2]]]  # forced 5, then FastV's top
    assert keep.tolist() == [[True, False, True, True, False, True], [True, True, True, False, False, True]]
    with pytest.raises(ValueError, match="larger than the image"):
        select_kept(FastV(), Budget(tokens=5), layout, scores, None, torch.Generator(), torch.device("cpu"))


def test_gather_plan_left_fills_kept_positions_in_input_order():
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 1]]).bool()
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]).bool()  # row 1 is left-padded
    position_ids = torch.arange(6)[None]
    cos = torch.arange(6.0)[None, :, None].expand(1, 6, 2)
    wanted = torch.tensor([[0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 0, 1]]).bool()
    plan = gather_plan(keep, real, position_ids, (cos, -cos), wanted)
    assert plan.gather_index.tolist() == [[0, 2, 3, 5], [0, 1, 2, 5]]
    assert plan.valid.all() and plan.attention_mask.tolist() == [[True] * 4, [False, True, True, True]]
    assert plan.position_ids.tolist() == plan.gather_index.tolist() == plan.slot_positions.tolist()
    assert plan.position_embeddings[0][..., 0].tolist() == [[0.0, 2.0, 3.0, 5.0], [0.0, 1.0, 2.0, 5.0]]
    assert plan.logit_slots.tolist() == [[False, False, True, True], [False, False, False, True]]


def test_gather_plan_pads_shorter_rows_with_invalid_filler_at_the_left():
    keep = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]).bool()
    plan = gather_plan(keep, torch.ones_like(keep), torch.arange(4)[None], (torch.ones(1, 4, 2), torch.ones(1, 4, 2)))
    assert plan.valid.tolist() == [[True] * 4, [False, False, True, True]]
    assert plan.gather_index[1, 2:].tolist() == [2, 3] and not plan.attention_mask[1, :2].any()


def test_logits_asked_at_a_dropped_position_fail_loudly():
    keep = torch.tensor([[1, 0, 1]]).bool()
    plan = gather_plan(keep, torch.ones_like(keep), torch.arange(3)[None], (torch.ones(1, 3, 2), torch.ones(1, 3, 2)))
    with pytest.raises(ValueError, match="dropped"):
        wanted_slots(torch.tensor([[0, 1, 0]]).bool(), plan.gather_index, plan.valid)


def test_a_decoding_step_extends_the_compressed_cache_mask_and_positions():
    plan = decode_plan(
        torch.tensor([[False, True, True]]), torch.tensor([[0, 4, 7]]), torch.tensor([[True]]), torch.tensor([[9]])
    )
    assert plan.attention_mask.tolist() == [[False, True, True, True]]
    assert plan.slot_positions.tolist() == [[0, 4, 7, 9]]
    assert plan.gather_index is None and plan.position_ids is None
