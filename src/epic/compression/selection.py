"""What a compression method sees for one image of one row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from epic.compression.vision import VisionImage


@dataclass
class ImageSelection:
    """Inputs for choosing the kept visual tokens of one image.

    Everything here is computed from the prompt only (the tokens before the first supervised label in
    training; the non-padding input at inference), so answers and padding never influence the choice.

    Attributes:
        positions: [n] input positions of this image's candidate visual tokens.
        budget: how many of them to keep (0 <= budget <= n).
        text_positions: [t] input positions of the prompt's text tokens.
        attention: [L] attention paid to every position by the last prompt token at layer K-1, averaged
            over heads (fp32; zero outside the prompt); None before the LLM (layer 0).
        key_norms: [L] L1 norm of every position's key states at layer K-1 (fp32); None before the LLM.
        features: [L, d] hidden states entering layer K (after the model's final norm unless the method asks
            for them raw), or None when the method does not ask for them.
        generator: a seeded CPU generator for methods that draw at random.
        vision: what the vision tower saw of this image, for a method that reads it (`needs_vision`), else None.
    """

    positions: torch.Tensor
    budget: int
    text_positions: torch.Tensor
    attention: torch.Tensor | None
    key_norms: torch.Tensor | None
    features: torch.Tensor | None
    generator: torch.Generator
    vision: VisionImage | None = None
