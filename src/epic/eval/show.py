"""`epic show`: one PNG with the question, the image and, per method, the patches it keeps highlighted on the patch
grid with the answer the model gave under that compression."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import epic
from epic.compression.registry import method_spec
from epic.data.dataset import image_token_count
from epic.data.encoding import encode_prompt
from epic.data.images import load_image
from epic.data.templates import Template, Turn

PANEL = 336  # pixels per panel side
TITLE = 44  # pixels above each panel: its method and kept tokens, then its answer
QUESTION = 26  # pixels above the titles for the question, when there is one
FONT_SIZE = 15


@dataclass
class KeptPatches:
    method: str
    tokens: int
    patches: list[int]  # indices into the patch grid (row-major)
    side: int  # patches per grid side
    answer: str = ""  # what the model answered under this compression ("" where it was not asked)


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
    max_new_tokens: int = 12,
) -> tuple[Image.Image, list[KeptPatches]]:
    """The image as the model sees it (after padding), and per method the patches it keeps for `question` and the
    answer greedy decoding gives under that compression."""
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
    pixel_values = pixel_values.to(next(model.parameters()).dtype)
    with torch.inference_mode():
        for method in methods:
            name, method_layer = method_spec(method, layer)
            with epic.compress(model, name, tokens=tokens, layer=method_layer) as state:
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    pixel_values=pixel_values,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=processor.tokenizer.pad_token_id,
                )
            answer = processor.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
            results.append(KeptPatches(method, tokens, [int(p) - first for p in state.kept[0]], side, answer))
    return image, results


def _fitted(text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def draw_kept(image: Image.Image, results: list[KeptPatches], question: str = "") -> Image.Image:
    """Panels side by side under the question: the image, then per method the dropped patches dimmed, the kept
    ones outlined, its kept count and its answer above it."""
    font = ImageFont.load_default(size=FONT_SIZE)
    top = QUESTION if question else 0
    base = image.convert("RGB").resize((PANEL, PANEL))
    canvas = Image.new("RGB", (PANEL * (len(results) + 1), top + TITLE + PANEL), "white")
    draw = ImageDraw.Draw(canvas)
    if question:
        draw.text((6, 4), _fitted(f"Q: {question}", font, canvas.width - 12), fill="black", font=font)
    canvas.paste(base, (0, top + TITLE))
    draw.text((6, top + 4), "image", fill="black", font=font)
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
        canvas.paste(panel, (PANEL * index, top + TITLE))
        left = PANEL * index + 6
        draw.text((left, top + 4), f"{result.method}: {len(kept)} of {result.side**2} kept", fill="black", font=font)
        if result.answer:
            answer = _fitted(f"A: {result.answer}", font, PANEL - 12)
            draw.text((left, top + 4 + FONT_SIZE + 4), answer, fill=(20, 60, 170), font=font)
    return canvas
