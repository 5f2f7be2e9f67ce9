"""`epic show`: one PNG with the image and, per method, the patches it keeps highlighted on the patch grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import epic
from epic.data.dataset import image_token_count
from epic.data.encoding import encode_prompt
from epic.data.images import load_image
from epic.data.templates import Template, Turn

PANEL = 336  # pixels per panel side
TITLE = 22  # pixels above each panel for its title


@dataclass
class KeptPatches:
    method: str
    tokens: int
    patches: list[int]  # indices into the patch grid (row-major)
    side: int  # patches per grid side


def kept_patches(
    model,
    processor,
    template: Template,
    image_path: Path,
    question: str,
    methods: list[str],
    tokens: int,
    layer: int = 2,
    image_mode: str = "pad",
) -> tuple[Image.Image, list[KeptPatches]]:
    """The image as the model sees it (after padding) and the patches each method keeps for `question`."""
    image = load_image(image_path, image_mode, processor.image_processor)
    pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    count = image_token_count(processor)
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{count} visual tokens do not form a square patch grid (CLS kept?): cannot draw them")
    ids = encode_prompt(
        [Turn("user", f"<image>\n{question}")], template, processor.tokenizer, processor.image_token_id, count
    )
    input_ids = torch.tensor([ids])
    first = ids.index(processor.image_token_id)
    results = []
    with torch.inference_mode():
        for method in methods:
            with epic.compress(model, method, tokens=tokens, layer=layer) as state:
                model(input_ids=input_ids, pixel_values=pixel_values.to(next(model.parameters()).dtype))
            results.append(KeptPatches(method, tokens, [int(p) - first for p in state.kept[0]], side))
    return image, results


def draw_kept(image: Image.Image, results: list[KeptPatches]) -> Image.Image:
    """Panels side by side: the image, then per method the dropped patches dimmed and the kept ones outlined."""
    base = image.convert("RGB").resize((PANEL, PANEL))
    canvas = Image.new("RGB", (PANEL * (len(results) + 1), PANEL + TITLE), "white")
    draw = ImageDraw.Draw(canvas)
    canvas.paste(base, (0, TITLE))
    draw.text((6, 4), "image", fill="black")
    for index, result in enumerate(results, start=1):
        cell = PANEL / result.side
        kept = set(result.patches)
        shade = Image.new("RGBA", (PANEL, PANEL), (0, 0, 0, 0))
        shade_draw = ImageDraw.Draw(shade)
        for patch in range(result.side * result.side):
            row, column = divmod(patch, result.side)
            box = (column * cell, row * cell, (column + 1) * cell - 1, (row + 1) * cell - 1)
            if patch in kept:
                shade_draw.rectangle(box, outline=(255, 40, 40, 255), width=2)
            else:
                shade_draw.rectangle(box, fill=(0, 0, 0, 170))
        panel = Image.alpha_composite(base.convert("RGBA"), shade).convert("RGB")
        canvas.paste(panel, (PANEL * index, TITLE))
        draw.text((PANEL * index + 6, 4), f"{result.method}: {len(kept)} of {result.side**2} kept", fill="black")
    return canvas
