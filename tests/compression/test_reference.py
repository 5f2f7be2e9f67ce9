"""The kept sets of DART, FastV, DivPrune and PyramidDrop against transcriptions of the released selection code, on
the same tensors.

The transcriptions below follow the released functions line by line (batch of one, one image, the image span given
by its start and length, everything after the span is query text). They differ only where docs/compression.md says
we differ on purpose, each marked `# deliberate:` at the line:
- budgets are exact: DART's released per-pivot share is `MAX_NUM_TRUNCTION // (pivots)`, so the configurations here
  use budgets where that division is exact;
- pivot order: the released DART visits its pivots in a Python set's iteration order (a hashing artefact); ours
  visits visual pivots, then text pivots, each by decreasing key norm;
- positions: after a drop the released PyramidDrop renumbers the kept sequence 0..L'-1; ours keeps each token's
  original RoPE position (as every method in the engine), so a later stage's ranking sees the original positions.
The engine runs batched with left padding; each row's reference runs on that row alone, unpadded.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import epic
from epic.compat import set_attention_implementation
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.helpers import Row, make_batch

SPEC = TinyLlavaSpec()
ROWS = [Row(before=3, after=6), Row(before=9, after=4), Row(before=1, after=11), Row(before=5, after=7)]


def released_dart_selection(
    last_layer_state: torch.Tensor,
    k_states: torch.Tensor,
    image_token_start_index: int,
    image_token_length: int,
    max_num_trunction: int,
    pivot_image_token: int,
    pivot_text_token: int,
) -> torch.Tensor:
    """A transcription of `get_retained_image_token` in ZichenWen1/DART's
    llava/model/language_model/modeling_llama_self.py (read at its fork xqy1111111/DART, commit
    0247657060a42dd329d6f273455bfad05d5b2c74).

    Args:
        last_layer_state: [1, L, d] the model's final norm of layer K-1's output.
        k_states: [1, heads, L, head_dim] layer K-1's keys after RoPE and repeat_kv.
    """
    token_topk = int(max_num_trunction // (pivot_image_token + pivot_text_token))
    k_states = k_states.permute(0, 2, 1, 3).reshape(k_states.shape[0], k_states.shape[2], -1)
    k_image = k_states[0][image_token_start_index : image_token_start_index + image_token_length, :]
    k_query = k_states[0][image_token_start_index + image_token_length :, :]
    image_norm = torch.norm(k_image, p=1, dim=-1)
    query_norm = torch.norm(k_query, p=1, dim=-1)
    image_indices = (image_norm.topk(pivot_image_token).indices + image_token_start_index).tolist()
    query_indices = (query_norm.topk(pivot_text_token).indices + image_token_start_index + image_token_length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length))
    valid_indices.difference_update(image_indices)
    for item in image_indices + query_indices:  # deliberate: the released code iterates list(set(...))
        valid_indices_list = sorted(valid_indices)  # the released list(set) of ints; sorted makes it definite
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(token_topk).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices.tolist()]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
    indices_set.difference_update(query_indices)
    return torch.tensor(sorted(indices_set))


def released_fastv_selection(last_layer_attention: torch.Tensor, start: int, length: int, keep: int) -> torch.Tensor:
    """A transcription of FastV's selection in pkunlp-icler/FastV's
    src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py (`fastv_forward`, commit
    6e1b3f051dbe8ece952c7cce2eb02cd213e2762c): the last token's head-averaged attention at layer K-1, top over
    the image span. `last_layer_attention`: [1, heads, L, L]; `keep` is round(length * (1 - FASTV_r)).
    """
    last_layer_attention_avg = torch.mean(last_layer_attention, dim=1)[0]
    last_tok_image = last_layer_attention_avg[-1][start : start + length]
    return (last_tok_image.topk(keep).indices + start).sort().values


def released_divprune_selection(
    visual_feature_vectors: torch.Tensor, image_feature_length: int, threshold_ratio: float
) -> torch.Tensor:
    """A transcription of `DivPrune` and `pairwise_cosine_similarity` in vbdi/divprune's
    LLaVA/llava/model/llava_arch.py (commit 799e2d950aa01ba7860907f5a6d86061f885dca6): greedy max-min cosine
    distance over the visual tokens' input embeddings. Returns the chosen indices in the order chosen."""
    threshold_terms = round(threshold_ratio * image_feature_length)
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            scores = torch.topk(cosine_matrix, 2, dim=0, largest=False).values[1, :]
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i)))
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s


def layer_inputs(model, batch: dict[str, torch.Tensor], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(final-normed output of layer K-1 [1, L, d], layer K-1's keys after RoPE and repeat_kv [1, H, L, hd]) of a
    stock forward, computed from what layer K-1's attention module receives."""
    attention = model.model.language_model.layers[layer - 1].self_attn
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["rope"] = kwargs["position_embeddings"]

    handle = attention.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
    finally:
        handle.remove()
    hidden = seen["hidden"]
    batch_size, length, _ = hidden.shape
    with torch.no_grad():
        keys = attention.k_proj(hidden).view(batch_size, length, -1, attention.head_dim).transpose(1, 2)
        cos, sin = seen["rope"]
        _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
        keys = repeat_kv(keys, attention.num_key_value_groups)
        normed = model.model.language_model.norm(out.hidden_states[layer])
    return normed, keys


def with_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` with position ids counted over real tokens, as `generate` does, so a left-padded row sees the RoPE
    positions it has alone (an L1 key norm depends on the absolute position)."""
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return {**batch, "position_ids": positions}


def one_row(batch: dict[str, torch.Tensor], row: int) -> tuple[dict[str, torch.Tensor], int]:
    """Row `row` of a left-padded batch alone and unpadded, and its padding offset."""
    valid = batch["attention_mask"][row].bool()
    offset = int((~valid).sum())
    alone = {
        "input_ids": batch["input_ids"][row : row + 1, offset:],
        "attention_mask": batch["attention_mask"][row : row + 1, offset:],
    }
    alone["pixel_values"] = batch["pixel_values"][row : row + 1]
    return alone, offset


@pytest.mark.parametrize("layer", [1, 2, 3])
@pytest.mark.parametrize(("budget", "pivots_image", "pivots_text"), [(12, 4, 4), (20, 4, 4), (7, 2, 3), (11, 1, 4)])
def test_dart_keeps_what_the_released_selection_keeps(layer, budget, pivots_image, pivots_text):
    model = build_tiny_llava()
    batch = make_batch(SPEC, ROWS, "left", labels=False, seed=layer)
    with (
        torch.no_grad(),
        epic.compress(
            model, "dart", tokens=budget, layer=layer, pivots_image=pivots_image, pivots_text=pivots_text
        ) as state,
    ):
        model(**with_positions(batch))
    for row in range(len(ROWS)):
        alone, offset = one_row(batch, row)
        start = int((alone["input_ids"][0] == SPEC.image_token_id).nonzero()[0])
        normed, keys = layer_inputs(model, alone, layer)
        expected = released_dart_selection(
            normed, keys, start, SPEC.image_tokens, budget - pivots_image, pivots_image, pivots_text
        )
        assert expected.numel() == budget
        assert (state.kept[row] - offset).tolist() == expected.tolist()


def test_dart_with_pivots_from_all_prompt_text_differs_from_the_released_selection():
    """The option `text_pivots_from="prompt"` is a real difference: on rows with long text before the image, some
    row's kept set moves (the transcription is the released one; if the option were ignored, all would match)."""
    model = build_tiny_llava()
    rows = [Row(before=20, after=4) for _ in range(4)]
    batch = make_batch(SPEC, rows, "left", labels=False, seed=5)
    with torch.no_grad(), epic.compress(model, "dart", tokens=12, layer=2, text_pivots_from="prompt") as state:
        model(**with_positions(batch))
    differing = 0
    for row in range(len(rows)):
        alone, offset = one_row(batch, row)
        start = int((alone["input_ids"][0] == SPEC.image_token_id).nonzero()[0])
        normed, keys = layer_inputs(model, alone, 2)
        expected = released_dart_selection(normed, keys, start, SPEC.image_tokens, 8, 4, 4)
        differing += (state.kept[row] - offset).tolist() != expected.tolist()
    assert differing > 0


@pytest.mark.parametrize("layer", [1, 2, 3])
@pytest.mark.parametrize("keep", [4, 7, 16, 32])
def test_fastv_keeps_what_the_released_selection_keeps(layer, keep):
    model = build_tiny_llava()
    batch = make_batch(SPEC, ROWS, "left", labels=False, seed=layer + keep)
    with torch.no_grad(), epic.compress(model, "fastv", tokens=keep, layer=layer) as state:
        model(**batch)
    set_attention_implementation(model.config.text_config, "eager")
    for row in range(len(ROWS)):
        alone, offset = one_row(batch, row)
        start = int((alone["input_ids"][0] == SPEC.image_token_id).nonzero()[0])
        with torch.no_grad():
            attentions = model(**alone, output_attentions=True).attentions[layer - 1]
        expected = released_fastv_selection(attentions, start, SPEC.image_tokens, keep)
        assert (state.kept[row] - offset).tolist() == expected.tolist()


def input_embeddings(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[1, L, d] what decoder layer 0 receives in a stock forward: text embeddings and projected visual features."""
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen["hidden"]


@pytest.mark.parametrize("keep", [4, 7, 16, 32])
def test_divprune_before_the_llm_keeps_what_the_released_selection_keeps(keep):
    model = build_tiny_llava()
    batch = make_batch(SPEC, ROWS, "left", labels=False, seed=keep)
    with torch.no_grad(), epic.compress(model, "divprune", tokens=keep, layer=0) as state:
        model(**with_positions(batch))
    for row in range(len(ROWS)):
        alone, offset = one_row(batch, row)
        start = int((alone["input_ids"][0] == SPEC.image_token_id).nonzero()[0])
        visual = input_embeddings(model, alone)[0, start : start + SPEC.image_tokens]
        expected = released_divprune_selection(visual, SPEC.image_tokens, keep / SPEC.image_tokens)
        assert (state.kept[row] - offset).tolist() == (expected + start).sort().values.tolist()


def released_pdrop_ranking(
    layer, rotary, hidden: torch.Tensor, positions: torch.Tensor, start: int, length: int, keep: int
) -> torch.Tensor:
    """A transcription of the ranking in `pdrop_rank_drop` (Cooperx521/PyramidDrop,
    llava/model/modeling_llama_pdrop.py, commit 6444f304aee4b7edcb022839fb9e8cd07859704a), inference branch: layer
    K's own attention over what enters it, from the last instruction token.

    Args:
        layer: decoder layer K (the rank layer); rotary: the model's rotary embedding.
        hidden: [1, L, d] what enters layer K; positions: [1, L] their RoPE positions.
        start, length: the image's span in `hidden`; keep: tokens to keep.
    """
    self_attn = layer.self_attn
    hidden_states = layer.input_layernorm(hidden)
    bsz, q_len, _ = hidden_states.size()
    head_dim = self_attn.head_dim
    query_states = self_attn.q_proj(hidden_states).view(bsz, q_len, -1, head_dim).transpose(1, 2)
    key_states = self_attn.k_proj(hidden_states).view(bsz, q_len, -1, head_dim).transpose(1, 2)
    cos, sin = rotary(hidden_states, positions)  # deliberate: original positions (released: 0..L'-1 after a drop)
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
    key_states = repeat_kv(key_states, self_attn.num_key_value_groups)  # LLaVA-1.5 has as many kv heads as heads
    causal = torch.full((q_len, q_len), torch.finfo(torch.float32).min).triu(1)
    last = q_len - 1  # prompt_total_len - 1: the whole input is the prompt at inference
    text_query_states = query_states[0][:, last, :].unsqueeze(1)
    attn_weights = torch.matmul(text_query_states, key_states[0].transpose(1, 2)) / math.sqrt(head_dim)
    attn_weights = attn_weights + causal[last]
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
    attention_avg_head = torch.mean(attn_weights, dim=0)
    attention_avg_head = attention_avg_head[:, start : start + length]
    attention_avg_text = torch.mean(attention_avg_head, dim=0)
    top_rank_index = attention_avg_text.topk(keep).indices
    return (top_rank_index + start).sort().values


def stage_inputs(model, batch: dict[str, torch.Tensor], layers: list[int], **compression) -> dict[int, torch.Tensor]:
    """What enters each of `layers` in a forward under `compression` (before that layer's own stage drops)."""
    seen = {}

    def grab(index):
        def hook(module, args, kwargs):
            seen[index] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        return hook

    decoder = model.model.language_model.layers
    handles = [decoder[index].register_forward_pre_hook(grab(index), with_kwargs=True) for index in layers]
    try:  # registered before the compression's hooks, so they see the sequence before the gather
        with torch.no_grad(), epic.compress(model, "pdrop", **compression):
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("keep", [8, 12, 32])
def test_pdrop_keeps_at_every_stage_what_the_released_ranking_keeps(layer, keep):
    """The default pyramid (λ = 0.5, as many as three stages): at each stage, the engine's batched, left-padded kept
    set equals the released ranking on what enters that stage's layer for the row alone."""
    model = build_tiny_llava()
    batch = make_batch(SPEC, ROWS, "left", labels=False, seed=layer * keep)
    with torch.no_grad(), epic.compress(model, "pdrop", tokens=keep, layer=layer) as state:
        model(**with_positions(batch))
    stages = state.stages
    assert len(stages) == min(3, 4 - layer)
    rotary = model.model.language_model.rotary_emb
    for row in range(len(ROWS)):
        alone, offset = one_row(batch, row)
        inputs = stage_inputs(model, alone, [stage.layer for stage in stages], tokens=keep, layer=layer)
        visual = alone["input_ids"][0] == SPEC.image_token_id
        previous = visual.nonzero().squeeze(1)
        for stage, kept in zip(stages, state.stage_kept, strict=True):
            positions = (~visual).nonzero().squeeze(1).tolist() + previous.tolist()
            positions = torch.tensor(sorted(positions))  # the slots entering this stage: text and the kept so far
            start = int(torch.isin(positions, previous).nonzero()[0])
            decoder_layer = model.model.language_model.layers[stage.layer]
            with torch.no_grad():
                slots = released_pdrop_ranking(
                    decoder_layer, rotary, inputs[stage.layer], positions[None], start, previous.numel(),
                    stage.budget.tokens,
                )  # fmt: skip
            expected = positions[slots]
            assert (kept[row] - offset).tolist() == expected.tolist(), (row, stage)
            previous = expected
