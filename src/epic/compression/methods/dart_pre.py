"""DART before the LLM (our extension): DART's pivots and duplication rule over the projected features."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from epic.compression.methods.dart import Dart
from epic.compression.registry import register_method
from epic.compression.selection import ImageSelection


@register_method("dart_pre")
@dataclass
class DartPre(Dart):
    """DART where there are no keys yet: pivots by the L1 norm of the features themselves, duplication by their
    cosine similarity, both over the hidden states entering the compression layer as they are (before the LLM,
    `layer=0`: the projected visual features and, for text pivots, the question's token embeddings).

    The released DART prunes inside the LLM only (pivots by layer K-1's key norms, after the final norm); this
    is our extension to the stage serving engines can run, documented in docs/compression.md.
    """

    raw_features = True  # Dart's `needs_features`, read as they are
    needs_scores = False

    def select(self, image: ImageSelection) -> torch.Tensor:
        feature_norms = image.features.float().abs().sum(dim=-1)  # [L] the analogue of DART's key norms
        return super().select(replace(image, key_norms=feature_norms))
