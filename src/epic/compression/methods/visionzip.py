"""VisionZip (Yang et al., CVPR 2025): dominant tokens by the vision tower's [CLS] attention, plus contextual tokens
merged from the rest, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epic.compression.registry import register_method
from epic.compression.selection import ImageSelection


@dataclass(frozen=True)
class VisionZipSplit:
    """Indices into an image's candidates: the dominant tokens, the contextual targets, and for every other
    remaining token the target it merges into (`assignment[j]` indexes `targets`)."""

    dominant: torch.Tensor  # [budget - contextual]
    targets: torch.Tensor  # [contextual]
    merged: torch.Tensor  # [r] the remaining tokens that are not targets
    assignment: torch.Tensor  # [r] values in 0..contextual-1


@register_method("visionzip")
@dataclass
class VisionZip:
    """Keep `budget - contextual` dominant tokens (the most attended by the tower's [CLS] query at its feature
    layer, or by the mean query where the tower has no [CLS], as SigLIP) and `contextual = round(budget *
    contextual_share)` contextual tokens: targets spaced evenly over the remaining tokens in order, each replaced
    by itself plus the mean of the remaining tokens whose keys (the feature layer's, averaged over heads) are most
    cosine-similar to it, merged in the vision tower's feature space and projected again.

    As released (dvlab-research/VisionZip) with 54 + 10 of 64, except: no [CLS] token is kept (LLaVA in
    transformers has no place for it; the released code keeps it as one of the dominant tokens), and the kept
    tokens keep their own positions and order. The merge passes gradients to the projector, not to the vision
    tower (whose forward runs under no_grad in the released code). Before the LLM only (`layer=0`).
    """

    contextual_share: float = 10 / 64

    needs_features = False
    needs_scores = False
    needs_vision = True
    before_llm_only = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.contextual_share <= 1.0:
            raise ValueError(f"VisionZip's contextual_share must be in [0, 1], got {self.contextual_share}")

    def split(self, image: ImageSelection) -> VisionZipSplit:
        """The dominant, contextual and merged tokens of `image` (indices into `image.positions`)."""
        vision = image.vision
        index = torch.searchsorted(vision.positions.to(image.positions.device), image.positions)
        contextual = min(round(image.budget * self.contextual_share), image.budget)
        dominant = vision.attention.to(index.device)[index].topk(image.budget - contextual).indices
        remaining = torch.ones(index.numel(), dtype=torch.bool, device=index.device)
        remaining[dominant] = False
        rest = remaining.nonzero().squeeze(1)  # [n - dominant], in position order
        if contextual == 0:
            empty = rest[:0]
            return VisionZipSplit(dominant, empty, empty, empty)
        step = max(1, rest.numel() // contextual)
        chosen = torch.arange(0, rest.numel(), step, device=rest.device)[:contextual]  # into `rest`
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
        is_target[chosen] = True
        keys = vision.keys.to(index.device)[index[rest]].float()  # [n - dominant, hd]
        keys = keys / keys.norm(dim=-1, keepdim=True)
        similarity = keys[~is_target] @ keys[is_target].T  # [r, contextual]
        return VisionZipSplit(dominant, rest[is_target], rest[~is_target], similarity.argmax(dim=1))

    def select(self, image: ImageSelection) -> torch.Tensor:
        split = self.split(image)
        return image.positions[torch.cat([split.dominant, split.targets]).sort().values]

    def merge(self, image: ImageSelection) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [m], embeddings [m, d]) replacing the contextual targets that others merged into: the
        projection of target + mean(merged) in the tower's feature space (a target nothing merged into stays)."""
        split = self.split(image)
        vision = image.vision
        index = torch.searchsorted(vision.positions.to(image.positions.device), image.positions)
        features = vision.features.detach()[index.to(vision.features.device)]  # [n, d_v]
        counts = torch.bincount(split.assignment, minlength=split.targets.numel())  # [contextual]
        sums = features.new_zeros(split.targets.numel(), features.shape[-1])
        sums.index_add_(0, split.assignment.to(sums.device), features[split.merged.to(sums.device)])
        contextual = features[split.targets.to(sums.device)] + sums / counts.clamp(min=1)[:, None].to(sums)
        changed = counts > 0
        return image.positions[split.targets[changed]], vision.project(contextual[changed.to(sums.device)])
