"""The modality- and length-grouped sampler."""

from __future__ import annotations

import pytest
import torch

from epic.data.sampler import ModalityLengthGroupedSampler


def lengths(n: int = 103, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(10, 500, (n,), generator=generator)
    signs = torch.where(torch.rand(n, generator=generator) < 0.7, 1, -1)
    return (values * signs).tolist()


def test_yields_a_permutation_with_single_modality_batches():
    values = lengths()
    sampler = ModalityLengthGroupedSampler(values, batch_size=4, world_size=2, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(values)))
    megabatch = 8
    mixed = 0
    for start in range(0, len(order), megabatch):
        group = order[start : start + megabatch]
        signs = {values[i] > 0 for i in group}
        mixed += len(signs) > 1
        if len(group) == megabatch and len(signs) == 1:
            sizes = [abs(values[i]) for i in group]
            assert sizes == sorted(sizes, reverse=True)
    assert mixed == 0


def test_order_depends_on_seed_and_epoch_only():
    values = lengths()
    first = list(ModalityLengthGroupedSampler(values, 4, seed=1))
    assert first == list(ModalityLengthGroupedSampler(values, 4, seed=1))
    assert first != list(ModalityLengthGroupedSampler(values, 4, seed=2))
    sampler = ModalityLengthGroupedSampler(values, 4, seed=1)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_bad_sizes():
    with pytest.raises(ValueError, match="batch_size and world_size must be positive"):
        ModalityLengthGroupedSampler([1, 2], batch_size=0)
