"""Reading the batch: where each row's images, prompt text, prompt end and padding are (pure functions).

Everything compression decides is computed from the prompt only, so the answer (training) and padding never
influence the choice: the prompt ends before the first supervised label; without labels, a boolean
`logits_to_keep` marks the positions whose next token is supervised, so its first True is the last prompt token;
otherwise (inference) the prompt is the whole non-padding input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from epic.labels import IGNORE_INDEX


@dataclass(frozen=True)
class BatchLayout:
    """Where things are in one prefill or training forward (input coordinates)."""

    attention_mask: torch.Tensor  # [B, L] bool, True at real tokens
    image_mask: torch.Tensor  # [B, L] bool, True at image tokens
    images: list[list[torch.Tensor]]  # per row, per image: its input positions [n]
    prompt_last: torch.Tensor  # [B] index of the last prompt token
    text_positions: list[torch.Tensor]  # per row: the prompt's text positions [t]
    tokens_per_image: int  # n, the same for every image of the batch
    slots: torch.Tensor | None = None  # [B, L] False at an earlier stage's filler slots (None: input coordinates)


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last True per row of a [B, L] bool tensor."""
    return mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)


def prompt_ends(
    valid: torch.Tensor, labels: torch.Tensor | None = None, logits_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[B] one past the last prompt position of each row (see the module docstring for the rule).

    Args:
        valid: [B, L] bool, True at real (non-padding) tokens.
        labels: [B, L] training labels, IGNORE_INDEX outside the answers; or None.
        logits_mask: [B, L] bool, the positions whose logits are wanted (a boolean `logits_to_keep`); or None.
    """
    whole_input = last_true(valid) + 1
    if labels is not None:
        supervised = labels != IGNORE_INDEX
        return torch.where(supervised.any(dim=1), supervised.int().argmax(dim=1), whole_input)
    if logits_mask is not None:
        wanted = logits_mask.to(valid.device)
        return torch.where(wanted.any(dim=1), wanted.int().argmax(dim=1) + 1, whole_input)
    return whole_input


def count_images(inputs: dict[str, Any]) -> int:
    """How many images a forward's inputs carry: `pixel_values` ([images, 3, H, W]) or precomputed features."""
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


def read_prefill(
    inputs: dict[str, Any], image_token_id: int
) -> tuple[BatchLayout, torch.Tensor | None, torch.Tensor | None]:
    """Read a prefill or training forward with images: its layout, the labels taken out of `inputs` (the engine
    computes the loss over the kept sequence) and the boolean `logits_to_keep` ([B, L], or None).

    `inputs` are the model's bound arguments; they lose `labels`, and a boolean `logits_to_keep` becomes 0 (those
    rows are projected at the LM head).
    """
    input_ids = inputs["input_ids"]
    attention_mask = inputs.get("attention_mask")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"epic.compress needs a 2D attention mask (got {attention_mask.dim()}D); static or "
            "compiled caches are not supported, use the default dynamic cache"
        )
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    labels = inputs.pop("labels", None)
    logits_mask = inputs.get("logits_to_keep")
    if not (isinstance(logits_mask, torch.Tensor) and logits_mask.dtype == torch.bool):
        logits_mask = None
    elif logits_mask.shape != input_ids.shape or labels is not None:
        raise ValueError("a boolean logits_to_keep must be [batch, length] like input_ids and comes without labels")
    else:
        inputs["logits_to_keep"] = 0
    image_mask = input_ids == image_token_id
    layout = read_layout(image_mask, valid, count_images(inputs), prompt_ends(valid, labels, logits_mask))
    return layout, labels, logits_mask


def read_layout(image_mask: torch.Tensor, valid: torch.Tensor, n_images: int, prompt_end: torch.Tensor) -> BatchLayout:
    """Split each row's image tokens into whole images and find its prompt text; every image must sit in the prompt.

    Args:
        image_mask: [B, L] bool, True at image tokens.
        valid: [B, L] bool, True at real tokens.
        n_images: the images of the whole batch (every image has the same number of tokens).
        prompt_end: [B] from `prompt_ends`.
    """
    batch_size, length = image_mask.shape
    total = int(image_mask.sum())
    if n_images == 0 or total % n_images:
        raise ValueError(
            f"input_ids hold {total} image tokens for {n_images} image(s): the image-token count does "
            "not match the images"
        )
    per_image = total // n_images
    prompt_last = prompt_end - 1
    positions = torch.arange(length, device=image_mask.device)
    images, text_positions = [], []
    for row in range(batch_size):
        if not valid[row].any() or prompt_last[row] < 0:
            raise ValueError(f"row {row} has no prompt (no real token before its first supervised label)")
        row_images = image_mask[row].nonzero().squeeze(1)
        if row_images.numel() % per_image:
            raise ValueError(
                f"row {row} holds {row_images.numel()} image tokens, not a multiple of the {per_image} tokens per image"
            )
        if row_images.numel() and row_images.max() > prompt_last[row]:
            raise ValueError(
                f"row {row} has image tokens after its first supervised label; images must sit in the prompt"
            )
        images.append(list(row_images.split(per_image)) if row_images.numel() else [])
        in_prompt = valid[row] & ~image_mask[row] & (positions <= prompt_last[row])
        text_positions.append(in_prompt.nonzero().squeeze(1))
    return BatchLayout(valid, image_mask, images, prompt_last, text_positions, per_image)
