"""FastV (Chen et al., ECCV 2024): keep the visual tokens the last prompt token attends to most at layer K-1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epic.compression.registry import register_method
from epic.compression.selection import ImageSelection


@register_method("fastv")
@dataclass
class FastV:
    """Top-`budget` visual tokens by the head-averaged attention of the last prompt token at layer K-1."""

    needs_features = False

    def select(self, image: ImageSelection) -> torch.Tensor:
        scores = image.attention[image.positions]
        top = scores.topk(image.budget).indices
        return image.positions[top].sort().values
