"""LLaVA's modality- and length-grouped sampler: batches hold rows of one modality and similar length."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def _megabatches(indices: list[int], lengths: list[int], size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffle, cut into megabatches of `size`, sort each by length (longest first)."""
    order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
    chunks = [order[start : start + size] for start in range(0, len(order), size)]
    return [sorted(chunk, key=lambda index: -abs(lengths[index])) for chunk in chunks]


class ModalityLengthGroupedSampler(Sampler[int]):
    """Yields indices so that each global batch holds image rows or text-only rows of similar length.

    `lengths[i]` is the token length of row i, positive for rows with an image and negative for text-only rows
    (LLaVA's convention). Megabatches of `batch_size * world_size` rows of one modality are sorted longest first;
    as in LLaVA, the incomplete megabatches of both modalities come last, back to back, so the final batches may
    mix them. Consecutive batches of a megabatch go to different ranks, so ranks see similar lengths. The order
    depends only on `seed` and `epoch` (call `set_epoch`), so a resumed run sees the same order.
    """

    def __init__(self, lengths: list[int], batch_size: int, world_size: int = 1, seed: int = 0) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
        self.lengths = list(lengths)
        self.megabatch = batch_size * world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        image = [i for i, length in enumerate(self.lengths) if length > 0]
        text = [i for i, length in enumerate(self.lengths) if length <= 0]
        groups = _megabatches(image, self.lengths, self.megabatch, generator)
        groups += _megabatches(text, self.lengths, self.megabatch, generator)
        full = [group for group in groups if len(group) == self.megabatch]
        partial = [group for group in groups if len(group) < self.megabatch]
        order = torch.randperm(len(full), generator=generator).tolist()
        batches = [full[i] for i in order] + partial  # incomplete groups last, as LLaVA does
        for group in batches:
            yield from group
