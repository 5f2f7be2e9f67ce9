"""Memory a piece of work adds at its peak: CUDA's peak allocation on a GPU, the sampled resident-set growth on a
CPU. `epic bench` and the training benchmarks (`benchmarks/train_step.py`, `benchmarks/kd_step.py`) use it."""

from __future__ import annotations

import resource
import threading
import time

import torch


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        return None


def resident_growth_during(work) -> int | None:
    """Resident-set growth during `work()`, sampled every millisecond (approximate: the allocator reuses memory)."""
    before = _resident_bytes()
    if before is None:
        work()
        return None
    peak, running = [before], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        running[0] = False
        sampler.join()
    return max(peak[0], _resident_bytes()) - before


def memory_growth_during(work, device: torch.device) -> int | None:
    """Bytes allocated above the level before `work()` at its peak: CUDA's peak allocation on a GPU, the sampled
    resident-set growth on a CPU (approximate)."""
    if device.type != "cuda":
        return resident_growth_during(work)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    work()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
