"""The model families the engine knows: which token marks an image in `input_ids` and how many tokens each image
of a forward has (LLaVA: the same for every image; Qwen2-VL and Qwen2.5-VL: from each image's `image_grid_thw`,
dynamic resolution). A family the engine does not know is refused when compression is attached, naming it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

FIXED_RESOLUTION = ("llava",)  # every image of a forward has the same number of tokens
GRID_RESOLUTION = ("qwen2_vl", "qwen2_5_vl")  # tokens per image = t * h * w / spatial_merge_size**2


@dataclass(frozen=True)
class Family:
    """How one model family lays out its images. `spatial_merge` is None for a fixed resolution."""

    model_type: str
    image_token_id: int
    spatial_merge: int | None = None

    @property
    def dynamic(self) -> bool:
        """Whether images may differ in token count (budgets are then per image; `tokens=` is capped per image)."""
        return self.spatial_merge is not None

    @classmethod
    def of(cls, model: nn.Module) -> Family:
        config = model.config
        model_type = getattr(config, "model_type", type(config).__name__)
        image_token_id = getattr(config, "image_token_id", None)
        known = ", ".join(FIXED_RESOLUTION + GRID_RESOLUTION)
        if model_type not in FIXED_RESOLUTION + GRID_RESOLUTION or image_token_id is None:
            raise ValueError(
                f"epic.compress does not know the model family {model_type!r} ({type(model).__name__}): it needs "
                f"where the image tokens are and how many each image has; supported: {known}"
            )
        if model_type in GRID_RESOLUTION:
            return cls(model_type, image_token_id, config.vision_config.spatial_merge_size)
        return cls(model_type, image_token_id)

    def image_sizes(self, inputs: dict[str, Any], total: int) -> list[int]:
        """The token count of every image of a forward, in the order the model places them (`total`: the image
        tokens of `input_ids`)."""
        if self.spatial_merge is None:
            return _equal_sizes(count_images(inputs), total)
        if inputs.get("pixel_values_videos") is not None or inputs.get("video_grid_thw") is not None:
            raise ValueError("epic.compress prunes image tokens; video inputs are not supported yet")
        grid = inputs.get("image_grid_thw")
        if grid is not None:
            return (grid.prod(dim=-1) // self.spatial_merge**2).tolist()
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")  # `generate` encodes the images first
        if encoded is not None:
            return [features.shape[0] for features in encoded.pooler_output]
        raise ValueError(f"{self.model_type} inputs with image tokens need image_grid_thw (from its processor)")


def _equal_sizes(n_images: int, total: int) -> list[int]:
    if n_images == 0 or total % n_images:
        raise ValueError(
            f"input_ids hold {total} image tokens for {n_images} image(s): the image-token count does "
            "not match the images"
        )
    return [total // n_images] * n_images


def count_images(inputs: dict[str, Any]) -> int:
    """How many images a LLaVA forward's inputs carry: `pixel_values` ([images, 3, H, W]) or precomputed features."""
    pixel_values = inputs.get("pixel_values")
    if pixel_values is not None:
        if pixel_values.dim() != 4:
            raise ValueError(
                f"epic.compress supports one [3, H, W] tensor per image (pixel_values of shape "
                f"[images, 3, H, W]); got shape {tuple(pixel_values.shape)}"
            )
        return pixel_values.shape[0]
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
    if encoded is not None:
        return len(encoded.pooler_output)
    raise ValueError("input_ids contain image tokens but neither pixel_values nor mm_encoder_outputs were given")
