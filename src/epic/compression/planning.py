"""Planning one compressed forward: scoring, selection, the gather plan and the masks (pure tensor functions).

A plan says how the layers from K on run: which input positions survive (left-filled to a common length, so the
last slot of every row is still the last input position, which `generate` reads), their position ids and rotary
tensors, and one attention mask per attention type. Nothing here holds state or touches a hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from epic.compat import Layout, attended_length, attention_implementation
from epic.compression.batch import BatchLayout
from epic.compression.budget import Budget
from epic.compression.registry import CompressionMethod
from epic.compression.selection import ImageSelection
from epic.compression.vision import VisionImage


class Scores(NamedTuple):
    """What layer K-1 tells about every position, from the prompt only."""

    attention: torch.Tensor  # [B, L] head-averaged attention of each row's last prompt token (fp32)
    key_norms: torch.Tensor  # [B, L] L1 norm of the key states (fp32)


@dataclass(kw_only=True)
class Plan:
    """How one forward runs from layer K on: which positions survive and the per-layer inputs."""

    gather_index: torch.Tensor | None  # [B, L'] input position of each slot (None when decoding)
    step_index: torch.Tensor | None = None  # [B, L'] the earlier stage's slot each slot takes (None: gather_index)
    valid: torch.Tensor | None  # [B, L'] False at filler slots (None when decoding)
    attention_mask: torch.Tensor  # [B, kv'] 2D mask over every cache slot of the compressed layers
    slot_positions: torch.Tensor  # [B, kv'] original position of every cache slot (for sliding windows)
    position_ids: torch.Tensor | None  # [B, L'] gathered; None when decoding (the stock ones are right) or where the
    # family's layers take none (Qwen2-VL: its M-RoPE positions live in the rotary tensors)
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None  # gathered rotary (cos, sin), [B, L', hd]
    logit_slots: torch.Tensor | None = None  # [B, L'] slots whose logits are wanted (a boolean logits_to_keep)
    masks: dict[str, Any] = field(default_factory=dict)  # attention type -> the mask its layers get
    merged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # new embeddings (rows, positions, [m, d])


def score_prompt(
    query: torch.Tensor, key: torch.Tensor, scaling: float, prompt_last: torch.Tensor, attention_mask: torch.Tensor
) -> Scores:
    """Attention of each row's last prompt token over the prompt (head-averaged) and key L1 norms.

    Args:
        query: [B, H, L, hd] post-RoPE queries of layer K-1; key: [B, kv_heads, L, hd] its keys.
        scaling: the attention module's softmax scale.
        prompt_last: [B] the last prompt position; attention_mask: [B, L] bool, True at real tokens.
    Only one attention row per batch row is computed, never the L x L map.
    """
    batch_size, length = query.shape[0], query.shape[2]
    if key.shape[2] != length:
        raise RuntimeError(f"scoring expects a fresh prefill: {length} queries but {key.shape[2]} keys")
    rows = torch.arange(batch_size, device=query.device)
    query_last = query[rows, :, prompt_last.to(query.device)]  # [B, H, hd]
    return score_last_query(query_last, key, scaling, prompt_last, attention_mask)


def score_last_query(
    query_last: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    prompt_last: torch.Tensor,
    attention_mask: torch.Tensor,
) -> Scores:
    """`score_prompt` from the query of each row's last prompt token alone ([B, H, hd]) and the keys
    ([B, kv_heads, L, hd])."""
    batch_size, heads, head_dim = query_last.shape
    kv_heads, length = key.shape[1], key.shape[2]
    last = prompt_last.to(query_last.device)
    query_last = query_last.float().view(batch_size, kv_heads, heads // kv_heads, head_dim)
    logits = torch.einsum("bgrd,bgld->bgrl", query_last, key.float()) * scaling  # [B, g, r, L]
    positions = torch.arange(length, device=query_last.device)
    allowed = attention_mask.to(query_last.device) & (positions[None, :] <= last[:, None])  # [B, L]
    logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return Scores(attention=logits.softmax(dim=-1).mean(dim=(1, 2)), key_norms=key.float().abs().sum(dim=(1, 3)))


class Selected(NamedTuple):
    """What `select_kept` chose for a batch."""

    keep: torch.Tensor  # [B, L] bool: surviving positions
    kept: list[list[torch.Tensor]]  # per row and image: the kept positions (on the CPU)
    merged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows [m], positions [m], embeddings [m, d])


def select_kept(
    method: CompressionMethod,
    budget: Budget,
    layout: BatchLayout,
    scores: Scores | None,
    features: torch.Tensor | None,
    generator: torch.Generator,
    device: torch.device,
    vision: list[list[VisionImage]] | None = None,
    cap_budgets: bool = False,
) -> Selected:
    """Run `method` on every image of every row.

    The last prompt token is never dropped (it may be an image token when a row ends with its image): it counts
    toward its image's budget. `scores` are None before the LLM (layer 0). `features` are [B, L, d] (or None when
    the method does not need them); `vision` is, per row and image, what the vision tower saw (for a method that
    reads it). The selection runs on `device` (the hidden states') without gradients; a method that merges
    (`merge`) computes the new embeddings of some kept tokens with them. The budget counts tokens of the original
    image (`layout.image_sizes`), also at a later stage, whose layout is in slot coordinates; `cap_budgets` keeps a
    whole image whose size is below an exact budget (dynamic resolution).
    """
    keep = ~layout.image_mask.to(device)
    if layout.slots is not None:
        keep &= layout.slots.to(device)
    merges = hasattr(method, "merge")
    kept, expected, merged = [], [], []
    for row, images in enumerate(layout.images):
        last = layout.prompt_last[row]
        row_kept = []
        for index, (positions, size) in enumerate(zip(images, layout.image_sizes[row], strict=True)):
            positions = positions.to(device)
            forced = positions[positions == last]
            candidates = positions[positions != last]
            share = max(budget.resolve(size, cap=cap_budgets) - forced.numel(), 0)
            image = ImageSelection(
                positions=candidates,
                budget=share,
                text_positions=layout.text_positions[row].to(device),
                attention=None if scores is None else scores.attention[row],
                key_norms=None if scores is None else scores.key_norms[row],
                features=None if features is None else features[row],
                generator=generator,
                vision=None if vision is None else vision[row][index],
            )
            with torch.no_grad():
                chosen = method.select(image)
            if chosen.numel() != share:
                raise RuntimeError(f"{type(method).__name__} kept {chosen.numel()} tokens, budget {share}")
            if merges:
                merged.append((row, *method.merge(image)))
            row_kept.append(torch.cat([forced, chosen]))
        if row_kept:
            keep[row, torch.cat(row_kept)] = True
        expected.append(sum(image_kept.numel() for image_kept in row_kept))
        kept.append([image_kept.cpu() for image_kept in row_kept])
    kept_visual = (keep & layout.image_mask.to(keep.device)).sum(dim=1)
    if not torch.equal(kept_visual.cpu(), torch.tensor(expected)):
        raise RuntimeError(f"{type(method).__name__} returned repeated positions or positions outside the image")
    return Selected(keep, kept, _stacked_merges(merged, device))


def _stacked_merges(
    merged: list[tuple[int, torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Per-image merges (row, positions [m_i], embeddings [m_i, d]) as one (rows, positions, embeddings)."""
    merged = [(row, positions, values) for row, positions, values in merged if positions.numel()]
    if not merged:
        return None
    rows = torch.cat([torch.full_like(positions, row) for row, positions, _ in merged]).to(device)
    positions = torch.cat([positions for _, positions, _ in merged]).to(device)
    return rows, positions, torch.cat([values for _, _, values in merged]).to(device)


def wanted_slots(wanted: torch.Tensor, gather_index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, L'] slots of the compressed sequence holding the `wanted` positions ([B, L] bool, original coordinates)."""
    slots = wanted.to(valid.device).gather(1, gather_index) & valid
    if int(slots.sum()) != int(wanted.sum()):
        raise ValueError("logits were asked for at positions that compression dropped (visual tokens)")
    return slots


def gather_plan(
    keep: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    logits_mask: torch.Tensor | None = None,
) -> Plan:
    """The plan of a prefill or training forward (its masks still to build).

    Args:
        keep: [B, L] bool surviving positions; attention_mask: [B, L] bool real tokens.
        position_ids: [1 or B, L] and position_embeddings: (cos, sin), each [1 or B, L, hd], as layer K received them
            (position_ids None where the family's layers take none, as Qwen2-VL's: M-RoPE lives in the rotary).
        logits_mask: [B, L] bool positions whose logits are wanted, or None.
    """
    batch_size, length = keep.shape
    kept_length = int(keep.sum(dim=1).max())
    order = torch.argsort(keep.int(), dim=1, stable=True)  # dropped first, kept in input order last
    gather_index = order[:, length - kept_length :]  # [B, L']
    valid = keep.gather(1, gather_index)
    gathered_ids = None if position_ids is None else position_ids.expand(batch_size, -1).gather(1, gather_index)
    cos, sin = position_embeddings
    rotary_index = gather_index[..., None].expand(-1, -1, cos.shape[-1])
    return Plan(
        gather_index=gather_index,
        valid=valid,
        attention_mask=valid & attention_mask.to(valid.device).gather(1, gather_index),
        slot_positions=gather_index if gathered_ids is None else gathered_ids,
        position_ids=gathered_ids,
        position_embeddings=(
            cos.expand(batch_size, -1, -1).gather(1, rotary_index),
            sin.expand(batch_size, -1, -1).gather(1, rotary_index),
        ),
        logit_slots=None if logits_mask is None else wanted_slots(logits_mask, gather_index, valid),
    )


def next_stage_plan(previous: Plan, keep: torch.Tensor) -> Plan:
    """A later stage's plan: `keep` ([B, L'] bool, in `previous`'s slot coordinates) gathered from `previous`'s
    sequence. Its `gather_index` is composed into input positions; `step_index` gathers from `previous`'s slots."""
    plan = gather_plan(
        keep, previous.attention_mask, previous.position_ids, previous.position_embeddings, previous.logit_slots
    )
    plan.step_index, plan.gather_index = plan.gather_index, previous.gather_index.gather(1, plan.gather_index)
    plan.slot_positions = previous.slot_positions.gather(1, plan.step_index)
    return plan


def slot_layout(layout: BatchLayout, plan: Plan) -> BatchLayout:
    """`layout` in the slot coordinates of `plan`'s compressed sequence, for the stage that selects from it: each
    image holds its kept slots, the prompt's last token and text are found by their input positions."""
    index, valid = plan.gather_index, plan.valid  # [B, L'] input position of each slot, False at filler
    image_mask = layout.image_mask.to(index.device).gather(1, index) & valid
    images, text_positions, prompt_last = [], [], []
    for row, row_images in enumerate(layout.images):

        def slots_of(positions: torch.Tensor, row: int = row) -> torch.Tensor:  # [L'] bool: the slots holding them
            return torch.isin(index[row], positions.to(index.device)) & valid[row]

        images.append([slots_of(positions).nonzero().squeeze(1) for positions in row_images])
        text_positions.append(slots_of(layout.text_positions[row]).nonzero().squeeze(1))
        prompt_last.append(slots_of(layout.prompt_last[row : row + 1]).int().argmax())
    return BatchLayout(
        attention_mask=plan.attention_mask,
        image_mask=image_mask,
        images=images,
        prompt_last=torch.stack(prompt_last),
        text_positions=text_positions,
        image_sizes=layout.image_sizes,
        slots=valid,
    )


def decode_plan(
    cache_mask: torch.Tensor, cache_positions: torch.Tensor, step_mask: torch.Tensor, step_positions: torch.Tensor
) -> Plan:
    """The plan of a decoding step: nothing is pruned; layers >= K get a mask over their shorter cache plus the new
    tokens. `cache_mask`/`cache_positions` are [B, kv'] (the compressed cache); `step_mask`/`step_positions` are
    [B, q] for the new tokens."""
    return Plan(
        gather_index=None,
        valid=None,
        attention_mask=torch.cat([cache_mask, step_mask], dim=1),
        slot_positions=torch.cat([cache_positions, step_positions], dim=1),
        position_ids=None,
        position_embeddings=None,
    )


def attention_types(text_config: Any, layers: int) -> list[str]:
    """Each decoder layer's attention type ('full_attention' or 'sliding_attention'), as the config names them."""
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        return list(layer_types[:layers])
    kind = "sliding_attention" if getattr(text_config, "sliding_window", None) else "full_attention"
    return [kind] * layers


def build_masks(
    plan: Plan,
    *,
    layout: Layout,
    text_config: Any,
    layer_types: list[str],
    first_layer: int,
    last_layer: int,
    query_length: int,
    cache: Any,
    like: torch.Tensor,
) -> None:
    """Fill `plan.masks`: one mask per attention type of layers [`first_layer`, `last_layer`), built before any of them
    writes to the cache, each sized against the first layer of its type.

    Sliding windows count original positions (the kept tokens keep their RoPE gaps), not slots of the shorter
    sequence. `like` is any tensor on the model's device and dtype.
    """
    implementation = attention_implementation(text_config)
    shape_like = like.new_empty(plan.attention_mask.shape[0], query_length, 0)
    for kind in dict.fromkeys(layer_types[first_layer:last_layer]):
        layer_index = layer_types.index(kind, first_layer)
        window = getattr(text_config, "sliding_window", None) if kind == "sliding_attention" else None
        positions = plan.slot_positions
        window_binds = window is not None and int(positions.max() - positions.min()) >= window
        if "flash" in implementation:
            if window_binds:
                raise NotImplementedError(
                    f"sliding-window layers (window {window}) over a compressed sequence that spans more "
                    "positions than the window are not supported under flash attention; use sdpa or eager"
                )
            kv_length = (
                plan.attention_mask.shape[1] if cache is None else attended_length(cache, query_length, layer_index)
            )
            plan.masks[kind] = plan.attention_mask[:, -kv_length:]
            continue
        within_window = None
        if window_binds:

            def within_window(batch_idx, head_idx, q_idx, kv_idx, positions=positions, window=window):
                return positions[batch_idx, q_idx] - positions[batch_idx, kv_idx] < window

        plan.masks[kind] = layout.mask(
            kind == "sliding_attention",
            config=text_config,
            inputs_embeds=shape_like,
            attention_mask=plan.attention_mask,
            cache=cache,
            position_ids=plan.slot_positions[:, -query_length:],
            layer_idx=layer_index,
            and_mask_function=within_window,
        )
