"""Decoding from a compressed KV cache: what the prefill left, and the mask of each later step.

Layers >= K cached only the kept tokens (each stage's layers their own), so each decoding step gives them a mask
over that shorter cache plus the new tokens (and, for sliding windows, the cached slots' original positions).
Nothing is pruned while decoding.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from epic.compat import cache_length
from epic.compression.planning import Plan, decode_plan


@dataclass
class CacheRecord:
    """What decoding needs from the prefill that filled a KV cache (and extends at each step), per stage: the
    layers of stage s ([K_s, K_s+1)) cached that stage's kept tokens."""

    cache: weakref.ReferenceType
    attention_masks: list[torch.Tensor] | None  # per stage [B, kv_s] 2D mask of its cache; None: no image
    slot_positions: list[torch.Tensor] | None  # per stage [B, kv_s] original positions of its cache's slots
    original_length: int  # the prefill's input length
    decoded: int = 0  # tokens fed by decoding steps since

    @property
    def seen(self) -> int:
        """Positions seen so far in original coordinates (what an uncompressed cache would hold)."""
        return self.original_length + self.decoded

    def check_continues(self, cache: Any, inputs: dict[str, Any]) -> None:
        """Refuse a decoding step on a cache this record does not describe, or one that brings new images."""
        if self.cache() is not cache:
            raise ValueError(
                "this KV cache was not filled by a prefill under this compression; run the prefill "
                "(or generate) inside the same epic.compress block"
            )
        if inputs.get("pixel_values") is not None or inputs.get("mm_encoder_outputs"):
            raise ValueError("continuing a compressed KV cache with new images is not supported")

    def step_plans(
        self, step_mask: torch.Tensor, position_ids: torch.Tensor, query_length: int, cache: Any, layers: list[int]
    ) -> list[Plan] | None:
        """The plans (one per stage) of one decoding step of `query_length` new tokens; the record is extended.

        Args:
            step_mask: [B, kv + q] the step's 2D attention mask (what `generate` passes); only its last q columns, the
                new tokens', are read, so a mask as wide as the compressed cache (layer 0's, when K = 0) serves too.
            position_ids: [1 or B, q] the new tokens' positions (None: counted in sequence order). `layers` are the
                stages' first layers (checked).
        Returns None when the prefill had no image (every layer holds the full cache).
        """
        self.decoded += query_length
        if self.attention_masks is None:
            return None
        new_mask = step_mask[:, -query_length:].bool()
        if position_ids is None:  # the family's layers take none (Qwen2-VL): slots count in sequence order
            position_ids = torch.arange(self.seen - query_length, self.seen, device=new_mask.device)[None]
        step_positions = position_ids.expand(new_mask.shape[0], -1)
        plans = []
        for mask, positions, layer in zip(self.attention_masks, self.slot_positions, layers, strict=True):
            plan = decode_plan(mask, positions, new_mask, step_positions)
            cached = cache_length(cache, layer)
            if plan.attention_mask.shape[1] != cached + query_length:
                raise RuntimeError(
                    f"compressed cache holds {cached} positions at layer {layer} but the attention mask implies "
                    f"{plan.attention_mask.shape[1] - query_length}"
                )
            plans.append(plan)
        self.attention_masks = [plan.attention_mask for plan in plans]
        self.slot_positions = [plan.slot_positions for plan in plans]
        return plans


def check_decoding(record: CacheRecord | None, cache: Any, inputs: dict[str, Any]) -> None:
    """Refuse a decoding step on a cache no prefill under this compression filled (`record` None), or that
    `record` does not describe."""
    if record is None:
        raise ValueError(
            "this KV cache was not filled by a prefill under this compression; run the prefill "
            "(or generate) inside the same epic.compress block"
        )
    record.check_continues(cache, inputs)
