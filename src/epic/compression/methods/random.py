"""Random: a uniform sample of visual tokens, drawn from a seeded generator (never Python's global RNG)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epic.compression.registry import register_method
from epic.compression.selection import ImageSelection


@register_method("random")
@dataclass
class Random:
    """`budget` visual tokens drawn uniformly without replacement.

    The draws come from the handle's generator, seeded by `compress(..., seed=...)`: the same seed and the
    same sequence of forwards keep the same tokens.
    """

    needs_features = False
    needs_scores = False  # runs inside the LLM or before it

    def select(self, image: ImageSelection) -> torch.Tensor:
        order = torch.randperm(image.positions.numel(), generator=image.generator)
        chosen = order[: image.budget].to(image.positions.device)
        return image.positions[chosen].sort().values
