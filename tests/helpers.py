"""Batches of LLaVA inputs for tests: images at known positions, prompts, answers, either padding side."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epic.models.tiny import TinyLlavaSpec

PAD_ID = 0
BOS_ID = 1


@dataclass(frozen=True)
class Row:
    """One sample: text, `images` images in a block, more text, then an answer (supervised)."""

    images: int = 1
    before: int = 4
    after: int = 6
    answer: int = 3


def make_batch(
    spec: TinyLlavaSpec, rows: list[Row], padding_side: str = "right", seed: int = 0, labels: bool = True
) -> dict[str, torch.Tensor]:
    """Token ids, 2D mask, labels (-100 outside answers and padding) and one pixel tensor per image."""
    generator = torch.Generator().manual_seed(seed)
    sequences, supervised = [], []
    for row in rows:
        text = lambda n: torch.randint(3, spec.image_token_id, (n,), generator=generator)  # noqa: E731
        parts = [torch.tensor([BOS_ID]), text(row.before)]
        parts += [torch.full((spec.image_tokens,), spec.image_token_id)] * row.images
        parts += [text(row.after)]
        prompt = torch.cat(parts)
        answer = text(row.answer) if labels else torch.empty(0, dtype=torch.long)
        sequences.append(torch.cat([prompt, answer]))
        is_answer = torch.cat([torch.zeros(len(prompt)), torch.ones(len(answer))]).bool()
        supervised.append(is_answer)
    length = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(rows), length), PAD_ID)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    label_ids = torch.full((len(rows), length), -100)
    for i, (seq, sup) in enumerate(zip(sequences, supervised, strict=True)):
        span = slice(0, len(seq)) if padding_side == "right" else slice(length - len(seq), length)
        input_ids[i, span] = seq
        attention_mask[i, span] = 1
        label_ids[i, span] = torch.where(sup, seq, -100)
    n_images = sum(row.images for row in rows)
    pixel_values = torch.randn(n_images, 3, spec.image_size, spec.image_size, generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if n_images:
        batch["pixel_values"] = pixel_values
    if labels:
        batch["labels"] = label_ids
    return batch
