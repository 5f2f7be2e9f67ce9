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

from epic.compression.families import Family
from epic.labels import IGNORE_INDEX


@dataclass(frozen=True)
class BatchLayout:
    """Where things are in one prefill or training forward (input coordinates)."""

    attention_mask: torch.Tensor  # [B, L] bool, True at real tokens
    image_mask: torch.Tensor  # [B, L] bool, True at image tokens
    images: list[list[torch.Tensor]]  # per row, per image: its input positions [n]
    prompt_last: torch.Tensor  # [B] index of the last prompt token
    text_positions: list[torch.Tensor]  # per row: the prompt's text positions [t]
    image_sizes: list[list[int]]  # per row, per image: its token count in the input (what budgets resolve against)
    slots: torch.Tensor | None = None  # [B, L] False at an earlier stage's filler slots (None: input coordinates)

    @property
    def tokens_per_image(self) -> int | None:
        """The token count every image of the batch has, or None when they differ (dynamic resolution)."""
        sizes = {size for row in self.image_sizes for size in row}
        return sizes.pop() if len(sizes) == 1 else None


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


def read_prefill(
    inputs: dict[str, Any], family: Family
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
    image_mask = input_ids == family.image_token_id
    sizes = family.image_sizes(inputs, int(image_mask.sum()))
    layout = read_layout(image_mask, valid, sizes, prompt_ends(valid, labels, logits_mask))
    return layout, labels, logits_mask


def read_layout(
    image_mask: torch.Tensor, valid: torch.Tensor, sizes: list[int], prompt_end: torch.Tensor
) -> BatchLayout:
    """Split each row's image tokens into whole images and find its prompt text; every image must sit in the prompt.

    Args:
        image_mask: [B, L] bool, True at image tokens.
        valid: [B, L] bool, True at real tokens.
        sizes: the token count of every image of the batch, in order (row by row, left to right).
        prompt_end: [B] from `prompt_ends`.
    """
    batch_size, length = image_mask.shape
    total = int(image_mask.sum())
    if sum(sizes) != total or not all(size > 0 for size in sizes):
        raise ValueError(
            f"input_ids hold {total} image tokens for {len(sizes)} image(s) of {sizes} tokens: the image-token count "
            "does not match the images"
        )
    prompt_last = prompt_end - 1
    positions = torch.arange(length, device=image_mask.device)
    remaining = iter(sizes)
    images, image_sizes, text_positions = [], [], []
    for row in range(batch_size):
        if not valid[row].any() or prompt_last[row] < 0:
            raise ValueError(f"row {row} has no prompt (no real token before its first supervised label)")
        row_images = image_mask[row].nonzero().squeeze(1)
        row_sizes, count = [], 0
        while count < row_images.numel():
            row_sizes.append(next(remaining, row_images.numel()))
            count += row_sizes[-1]
        if count != row_images.numel():
            raise ValueError(
                f"row {row} holds {row_images.numel()} image tokens, not whole images of {row_sizes} tokens"
            )
        if row_images.numel() and row_images.max() > prompt_last[row]:
            raise ValueError(
                f"row {row} has image tokens after its first supervised label; images must sit in the prompt"
            )
        images.append(list(row_images.split(row_sizes)) if row_images.numel() else [])
        image_sizes.append(row_sizes)
        in_prompt = valid[row] & ~image_mask[row] & (positions <= prompt_last[row])
        text_positions.append(in_prompt.nonzero().squeeze(1))
    return BatchLayout(valid, image_mask, images, prompt_last, text_positions, image_sizes)
