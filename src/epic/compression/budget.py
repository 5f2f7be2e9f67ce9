"""How many visual tokens of an image survive: an exact count or a ratio (torch-free: the CLI reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_KEPT_FRACTION = 1 / 9  # the commands' default budget: N/9 (64 of LLaVA-1.5's 576, the paper's headline)


def default_tokens(image_tokens: int) -> int:
    """Visual tokens a command keeps when no budget is given: N/9 of the image's, at least one."""
    return max(1, round(image_tokens * DEFAULT_KEPT_FRACTION))


@dataclass(frozen=True)
class Budget:
    """Kept visual tokens per image: an exact count, or a ratio r meaning `round(N * (1 - r))`."""

    tokens: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.ratio is None):
            raise ValueError(f"give exactly one of tokens= or ratio= (got tokens={self.tokens}, ratio={self.ratio})")
        if self.tokens is not None and (isinstance(self.tokens, bool) or self.tokens < 0):
            raise ValueError(f"tokens must be a non-negative integer, got {self.tokens!r}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must lie in [0, 1), got {self.ratio!r}")

    def resolve(self, image_tokens: int, cap: bool = False) -> int:
        """The exact number of tokens to keep from an image of `image_tokens` visual tokens; with `cap` (images of
        different sizes), an exact count larger than the image keeps the whole image instead of failing."""
        tokens = self.tokens if self.tokens is not None else round(image_tokens * (1.0 - self.ratio))
        if cap:
            return min(tokens, image_tokens)
        if tokens > image_tokens:
            raise ValueError(
                f"budget of {tokens} visual tokens is larger than the image ({image_tokens} visual tokens)"
            )
        return tokens


def configured_image_tokens(config: Any) -> int | None:
    """Visual tokens per image that a LLaVA config implies (a square tower's patches, +1 for the 'full' strategy's
    CLS), or None where the vision config does not say (a budget is then checked at the first forward)."""
    vision = getattr(config, "vision_config", None)
    image_size, patch_size = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        return None
    tokens = (image_size // patch_size) ** 2
    return tokens + 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else tokens
