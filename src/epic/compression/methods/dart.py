"""DART (Wen et al., 2025, "duplication matters more"): keep the visual tokens least similar to a few pivots."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from epic.compression.registry import register_method
from epic.compression.selection import ImageSelection

TEXT_PIVOT_SPANS = {
    "after_image": "the prompt text after the image (the released code)",
    "prompt": "all prompt text",
}


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers differing by at most one, larger shares first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@register_method("dart")
@dataclass
class Dart:
    """Duplication-aware selection.

    Pivots: the `pivots_image` visual tokens and the `pivots_text` text tokens with the largest L1 key norm
    at layer K-1. Text pivots come from the prompt text after the image (`text_pivots_from="after_image"`, as
    the released code: the question and the assistant prefix) or from all prompt text (`"prompt"`, where a
    fixed system prompt competes). Visual pivots are kept (they count toward the budget); the rest of the
    budget is spread evenly over all pivots and, pivot by pivot (visual pivots first, each group by
    decreasing key norm), filled with the remaining visual tokens least cosine-similar to that pivot (hidden
    states entering layer K, after the final norm).
    """

    pivots_image: int = 4
    pivots_text: int = 4
    text_pivots_from: str = "after_image"
    needs_features = True

    def __post_init__(self) -> None:
        if self.pivots_image < 0 or self.pivots_text < 0 or self.pivots_image + self.pivots_text == 0:
            raise ValueError(
                f"DART needs at least one pivot; got pivots_image={self.pivots_image}, pivots_text={self.pivots_text}"
            )
        if self.text_pivots_from not in TEXT_PIVOT_SPANS:
            raise ValueError(f"DART text_pivots_from={self.text_pivots_from!r} is not one of {list(TEXT_PIVOT_SPANS)}")

    def text_candidates(self, image: ImageSelection) -> torch.Tensor:
        """The text positions text pivots are drawn from, for this image."""
        text = image.text_positions
        if self.text_pivots_from == "after_image":
            return text[text > image.positions.max()]
        return text

    def select(self, image: ImageSelection) -> torch.Tensor:
        positions, budget = image.positions, image.budget
        n_image_pivots = min(self.pivots_image, budget)
        image_pivot_idx = image.key_norms[positions].topk(n_image_pivots).indices
        text = self.text_candidates(image)
        n_text_pivots = min(self.pivots_text, text.numel())
        text_pivots = text[image.key_norms[text].topk(n_text_pivots).indices]
        pivots = torch.cat([positions[image_pivot_idx], text_pivots])
        if pivots.numel() == 0 and budget > 0:
            raise ValueError(
                f"DART found no pivot: pivots_image=0 and no prompt text to draw from (text_pivots_from="
                f"{self.text_pivots_from!r}); use pivots_image > 0"
            )

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
