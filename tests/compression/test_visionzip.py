"""VisionZip against a transcription of the released selection and merge, on the same tensors; its one-row
attention against the tower's full attention map; towers without a [CLS]; and its failures.

The transcription differs from the released code only where docs/compression.md says we differ on purpose, marked
`# deliberate:` or `# added:` at the line: no [CLS] token is kept (LLaVA in transformers has no place for it), so
the released `dominant_num` patches plus our contextual count make the budget; the released function returns the
kept features in its own order, and also (added) which patches they came from.
"""

from __future__ import annotations

import pytest
import torch
from transformers import SiglipVisionConfig

import epic
from epic.compat import VisionScoring
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava, tiny_llava_config
from tests.helpers import Row, make_batch

SPEC = TinyLlavaSpec()
ROWS = [Row(before=3, after=6), Row(before=9, after=4, images=2), Row(images=0), Row(before=1, after=11)]


def released_visionzip(
    attn_weights: torch.Tensor,
    hidden_states: torch.Tensor,
    metric: torch.Tensor,
    dominant_num: int,
    contextual_num: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A transcription of `CLIPVisionTower_VisionZip.forward` in dvlab-research/VisionZip's visionzip/clip_encoder.py
    (commit 3151f6df4fca36a4cd1c985e5956e725b1f9ad02), from its attention weights on.

    Args:
        attn_weights: [B, heads, T, T] the attention of the tower's layer -2 (`attentions[-2]`), [CLS] first.
        hidden_states: [B, T, d_v] that layer's output (`hidden_states[-2]`); metric: [B, T, hd] its keys averaged
            over heads (the released `layers[-2].metric`).
    Returns (dominant patch indices, contextual target patch indices, contextual tokens [B, contextual, d_v]); patch
    indices count from 0 at the first token after [CLS].
    """
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1 :]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), -1)
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2]
    )
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, others, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, others, :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    filtered_positions = mask[0].nonzero().squeeze(1)  # added: which token each filtered row is
    # deliberate: the released code returns torch.cat([dominant_tokens, contextual_tokens]) with [CLS] first
    return topk_indices[0] - 1, filtered_positions[target_indices] - 1, contextual_tokens


def tower_outputs(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attentions of the feature layer [1, H, T, T], its output [1, T, d_v], its keys averaged over heads) from a
    stock eager forward of the vision tower."""
    layer = VisionScoring.of(model).layer  # encoder layer -2 (the tiny LLaVA's vision_feature_layer)
    keys = {}
    handle = layer.self_attn.k_proj.register_forward_hook(lambda module, args, output: keys.update(k=output))
    try:
        with torch.no_grad():
            out = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
    finally:
        handle.remove()
    heads = layer.self_attn.num_heads
    metric = keys["k"].view(1, -1, heads, keys["k"].shape[-1] // heads).transpose(1, 2).mean(1)
    return out.attentions[-2], out.hidden_states[-2], metric


def layer0_inputs(model, batch: dict, **compression) -> tuple[torch.Tensor, epic.Compression]:
    """What decoder layer 0 receives under VisionZip ([B, L', d], after the gather) and the handle."""
    seen = {}
    state = epic.compress(model, "visionzip", **compression)
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(hidden=kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
        state.remove()
    return seen["hidden"], state


@pytest.mark.parametrize(("dominant", "contextual"), [(13, 3), (5, 2), (24, 8), (1, 1)])
def test_visionzip_keeps_and_merges_what_the_released_code_does(dominant, contextual):
    model = build_tiny_llava(seed=2, attn_implementation="eager")
    batch = make_batch(SPEC, ROWS, "left", labels=False, seed=dominant)
    budget = dominant + contextual
    hidden, state = layer0_inputs(model, batch, tokens=budget, contextual_share=contextual / budget)
    image = 0
    for row, row_spec in enumerate(ROWS):
        starts = (batch["input_ids"][row] == SPEC.image_token_id).nonzero().squeeze(1)[:: SPEC.image_tokens]
        kept = state.kept[row].tolist()
        for start in starts.tolist():
            attention, output, metric = tower_outputs(model, batch["pixel_values"][image : image + 1])
            dominant_patches, targets, contextual_tokens = released_visionzip(
                attention, output, metric, dominant, contextual
            )
            ours = sorted(p - start for p in kept if start <= p < start + SPEC.image_tokens)
            assert ours == sorted(dominant_patches.tolist() + targets.tolist())
            slots = state.original_positions[row]
            for target, token in zip(targets.tolist(), contextual_tokens[0], strict=True):
                slot = int((slots == start + target).nonzero())
                with torch.no_grad():
                    expected = model.model.multi_modal_projector(token)
                torch.testing.assert_close(hidden[row, slot], expected, atol=1e-5, rtol=1e-5)
            image += 1
        assert len(kept) == budget * row_spec.images


def test_one_attention_row_equals_the_towers_full_map():
    model = build_tiny_llava(seed=3, attn_implementation="eager")
    pixels = make_batch(SPEC, ROWS, labels=False)["pixel_values"]
    scoring = VisionScoring.of(model)
    entering = {}
    handle = scoring.layer.register_forward_pre_hook(lambda module, args: entering.update(h=args[0]))
    try:
        attention_map = model.model.vision_tower(pixels, output_attentions=True).attentions[-2]  # [N, H, T, T]
    finally:
        handle.remove()
    received, _ = scoring.attention_and_keys(entering["h"])
    torch.testing.assert_close(received, attention_map[:, :, 0].sum(dim=1), atol=1e-6, rtol=1e-5)


def siglip_llava():
    """A tiny LLaVA whose vision tower is SigLIP (no [CLS]; every token is an image token)."""
    config = tiny_llava_config(SPEC)
    vision = config.vision_config
    config.vision_config = SiglipVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
    )
    config.vision_feature_select_strategy = "full"
    config.vision_config._attn_implementation = "eager"
    return type(build_tiny_llava())(config).eval()


def test_a_tower_without_cls_ranks_by_the_mean_query_in_chunks():
    model = siglip_llava()
    scoring = VisionScoring.of(model)
    assert not scoring.has_cls and not scoring.drops_first
    hidden = torch.randn(2, SPEC.image_tokens, model.config.vision_config.hidden_size)
    with torch.no_grad():
        received, _ = scoring.attention_and_keys(hidden, chunk=5)
        full, _ = scoring.attention_and_keys(hidden, chunk=SPEC.image_tokens)
        normed = scoring.layer.layer_norm1(hidden)
        attention = scoring.layer.self_attn(normed, attention_mask=None)[1]  # eager weights [N, H, T, T]
    torch.testing.assert_close(received, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(received, attention.mean(dim=2).sum(dim=1), atol=1e-6, rtol=1e-5)
    batch = make_batch(SPEC, ROWS, "left", labels=False)
    with torch.no_grad(), epic.compress(model, "visionzip", tokens=10) as state:
        model(**batch)
    assert [len(kept) for kept in state.kept] == [10, 20, 0, 10]


def test_visionzip_refuses_features_computed_before_it_was_attached():
    model = build_tiny_llava(seed=1)
    batch = make_batch(SPEC, ROWS[:2], "left", labels=False)
    features = model.model.get_image_features(pixel_values=batch.pop("pixel_values"), return_dict=True)
    encoded = {"mm_encoder_outputs": {"image": features}} if _accepts_encoder_outputs(model) else None
    if encoded is None:
        pytest.skip("this transformers takes no precomputed image features")
    with epic.compress(model, "visionzip", tokens=8), pytest.raises(RuntimeError, match="did not run under this"):
        model(**batch, **encoded)


def test_visionzip_refuses_a_record_of_other_images():
    model = build_tiny_llava(seed=1)
    batch = make_batch(SPEC, ROWS[:2], "left", labels=False)
    other = make_batch(SPEC, ROWS[:2], "left", labels=False, seed=9)["pixel_values"]
    pixels = batch.pop("pixel_values")
    with torch.no_grad(), epic.compress(model, "visionzip", tokens=8):
        model.model.get_image_features(pixel_values=other, return_dict=True)  # recorded, then stale
        features = model.model.get_image_features(pixel_values=pixels, return_dict=True)
        model.model.get_image_features(pixel_values=other, return_dict=True)
        if not _accepts_encoder_outputs(model):
            pytest.skip("this transformers takes no precomputed image features")
        with pytest.raises(RuntimeError, match="does not match this forward's image embeddings"):
            model(**batch, mm_encoder_outputs={"image": features})


def test_visionzip_runs_before_the_llm_only_and_defaults_there():
    model = build_tiny_llava()
    with pytest.raises(ValueError, match=r"'visionzip' runs before the LLM only: use layer=0 \(visionzip@0"):
        epic.compress(model, "visionzip", tokens=8, layer=2)
    with epic.compress(model, "visionzip", tokens=8) as state:
        assert state.layer == 0
    with pytest.raises(ValueError, match="contextual_share must be in"):
        epic.compress(model, "visionzip", tokens=8, contextual_share=1.5)


def _accepts_encoder_outputs(model) -> bool:
    import inspect

    return "mm_encoder_outputs" in inspect.signature(model.model.forward).parameters
