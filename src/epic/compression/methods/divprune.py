"""DivPrune (Alvar et al., CVPR 2025): keep a maximally diverse subset of the visual features (max-min diversity)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from epic.compression.registry import register_method
from epic.compression.selection import ImageSelection


@register_method("divprune")
@dataclass
class DivPrune:
    """Greedy max-min diversity over cosine distance of the features entering the compression layer.

    The first kept token is the one whose nearest other token is farthest; each next one is the token farthest
    (by its distance to the nearest kept token) from those already kept. Meant for before the LLM (`layer=0`:
    the projected visual features, as released); inside the LLM it reads the hidden states entering layer K.
    Needs no attention, so it runs with every attention implementation and in serving engines.
    """

    needs_features = True
    raw_features = True  # the projector's output as it is, as the released code
    needs_scores = False

    def select(self, image: ImageSelection) -> torch.Tensor:
        positions, budget = image.positions, image.budget
        if budget == 0:
            return positions[:0]
        features = F.normalize(image.features[positions].float(), dim=-1)  # [n, d]
        distance = 1.0 - features @ features.T  # [n, n] cosine distance
        nearest_other = distance.fill_diagonal_(float("inf")).min(dim=0).values  # [n]
        first = int(nearest_other.argmax())
        distance.fill_diagonal_(0.0)
        chosen = torch.zeros(positions.numel(), dtype=torch.bool, device=positions.device)
        chosen[first] = True
        to_chosen = distance[first].clone()  # [n] distance of every token to its nearest kept token
        for _ in range(budget - 1):
            pick = int(to_chosen.masked_fill(chosen, float("-inf")).argmax())
            chosen[pick] = True
            to_chosen = torch.minimum(to_chosen, distance[pick])
        return positions[chosen]
