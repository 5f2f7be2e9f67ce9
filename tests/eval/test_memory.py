"""`epic.eval.memory`: the memory a piece of work adds at its peak, on the CPU."""

from __future__ import annotations

import torch

from epic.eval.memory import memory_growth_during

MIB = 2**20


def test_a_large_allocation_shows_as_growth_and_nothing_shows_as_little():
    def allocate() -> None:
        block = torch.ones(64 * MIB // 4)  # 64 MiB of float32, every page written
        assert block.sum() > 0

    grown = memory_growth_during(allocate, torch.device("cpu"))
    idle = memory_growth_during(lambda: None, torch.device("cpu"))
    assert grown is not None and idle is not None  # Linux: /proc/self/statm is there
    assert grown >= 48 * MIB
    assert idle < 8 * MIB
