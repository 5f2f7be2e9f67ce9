"""Image loading as LLaVA-1.5 does it: RGB, padded to a square with the processor's mean colour, or resized."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

IMAGE_MODES = ("pad", "resize")


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre `image` on a square canvas of its longer side, filled with `fill` (LLaVA's "pad" aspect mode)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_processor) -> tuple[int, int, int]:
    """The processor's normalisation mean as an 8-bit RGB colour, truncated as LLaVA's `expand2square` does."""
    return tuple(int(channel * 255) for channel in image_processor.image_mean)


def prepare_image(image: Image.Image, mode: str, image_processor) -> Image.Image:
    """RGB, then the aspect mode: `pad` (to a square, mean colour) or `resize` (the processor's own)."""
    if mode not in IMAGE_MODES:
        raise ValueError(f"unknown image mode {mode!r}; choose one of {IMAGE_MODES}")
    image = image.convert("RGB")
    return pad_to_square(image, mean_colour(image_processor)) if mode == "pad" else image


def load_image(path: Path, mode: str, image_processor) -> Image.Image:
    """Open `path` and prepare it as `prepare_image` does."""
    with Image.open(path) as opened:
        return prepare_image(opened, mode, image_processor)
