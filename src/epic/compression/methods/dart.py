"""DART (Wen et al., 2025, "duplication matters more"): keep the visual tokens least similar to a few pivots."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from epic.compression.registry import register_method
from epic.compression.selection import ImageSelection


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers differing by at most one, larger shares first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@register_method("dart")
@dataclass
class Dart:
    """Duplication-aware selection.

    Pivots: the `pivots_image` visual tokens and the `pivots_text` prompt text tokens with the largest L1
    key norm at layer K-1. Visual pivots are kept (they count toward the budget); the rest of the budget is
    spread evenly over all pivots and, pivot by pivot, filled with the remaining visual tokens least
    cosine-similar to that pivot (hidden states entering layer K, after the final norm).
    """

    pivots_image: int = 4
    pivots_text: int = 4
    needs_features = True

    def __post_init__(self) -> None:
        if self.pivots_image < 0 or self.pivots_text < 0 or self.pivots_image + self.pivots_text == 0:
            raise ValueError(
                f"DART needs at least one pivot; got pivots_image={self.pivots_image}, pivots_text={self.pivots_text}"
            )

    def select(self, image: ImageSelection) -> torch.Tensor:
        positions, budget = image.positions, image.budget
        n_image_pivots = min(self.pivots_image, budget)
        image_pivot_idx = image.key_norms[positions].topk(n_image_pivots).indices
        text = image.text_positions
        n_text_pivots = min(self.pivots_text, text.numel())
        text_pivots = text[image.key_norms[text].topk(n_text_pivots).indices]
        pivots = torch.cat([positions[image_pivot_idx], text_pivots])
        if pivots.numel() == 0 and budget > 0:
            raise ValueError("DART found no pivot: pivots_image=0 and the prompt has no text tokens")

        in_pool = torch.ones(positions.numel(), dtype=torch.bool, device=positions.device)
        in_pool[image_pivot_idx] = False
        kept = [positions[image_pivot_idx]]
        remaining = budget - n_image_pivots
        if remaining > 0:
            features = F.normalize(image.features[positions].float(), dim=-1)  # [n, d]
            pivot_features = F.normalize(image.features[pivots].float(), dim=-1)  # [P, d]
            similarity = pivot_features @ features.T  # [P, n]
            for row, share in zip(similarity, split_evenly(remaining, pivots.numel()), strict=True):
                if share == 0:
                    continue
                least_similar = row.masked_fill(~in_pool, float("inf")).topk(share, largest=False).indices
                in_pool[least_similar] = False
                kept.append(positions[least_similar])
        return torch.cat(kept).sort().values
