"""Decoding from a compressed KV cache: what the prefill left, and the mask of each later step.

Layers >= K cached only the kept tokens, so each decoding step gives them a mask over that shorter cache plus the
new tokens (and, for sliding windows, the cached slots' original positions). Nothing is pruned while decoding.
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
    """What decoding needs from the prefill that filled a KV cache (and extends at each step)."""

    cache: weakref.ReferenceType
    attention_mask: torch.Tensor | None  # [B, kv'] 2D mask of the compressed cache; None when it had no image
    slot_positions: torch.Tensor | None  # [B, kv'] original positions of the compressed cache's slots
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

    def step_plan(
        self, step_mask: torch.Tensor, position_ids: torch.Tensor, query_length: int, cache: Any, layer: int
    ) -> Plan | None:
        """The plan of one decoding step of `query_length` new tokens, and the record extended by them.

        Args:
            step_mask: [B, kv + q] the step's 2D attention mask (what `generate` passes); only its last q columns, the
                new tokens', are read, so a mask as wide as the compressed cache (layer 0's, when K = 0) serves too.
            position_ids: [1 or B, q] the new tokens' positions. `layer` is K, whose cache is checked.
        Returns None when the prefill had no image (layers >= K hold the full cache).
        """
        self.decoded += query_length
        if self.attention_mask is None:
            return None
        new_mask = step_mask[:, -query_length:].bool()
        step_positions = position_ids.expand(new_mask.shape[0], -1)
        plan = decode_plan(self.attention_mask, self.slot_positions, new_mask, step_positions)
        cached = cache_length(cache, layer)
        if plan.attention_mask.shape[1] != cached + query_length:
            raise RuntimeError(
                f"compressed cache holds {cached} positions at layer {layer} but the attention mask implies "
                f"{plan.attention_mask.shape[1] - query_length}"
            )
        self.attention_mask, self.slot_positions = plan.attention_mask, plan.slot_positions
        return plan


def check_decoding(record: CacheRecord | None, cache: Any, inputs: dict[str, Any]) -> None:
    """Refuse a decoding step on a cache no prefill under this compression filled (`record` None), or that
    `record` does not describe."""
    if record is None:
        raise ValueError(
            "this KV cache was not filled by a prefill under this compression; run the prefill "
            "(or generate) inside the same epic.compress block"
        )
    record.check_continues(cache, inputs)
