"""Progressive schedules of EPIC (SPEC section 2), as pure functions of training progress.

Progress p = optimizer step / total optimizer steps, in [0, 1]. Random draws come from a generator seeded by
(seed, step, stream), never from a stateful stream, so a resumed run draws exactly what an uninterrupted run drew at
the same step. The stream numbers the micro-batches of a step across ranks (micro-step x world size + rank), so two
ranks draw what one process draws for two accumulated micro-batches.

Token Consistency Distillation (TCD): the student ratio r_s ~ U(R_min(p), R_max(p)), both rising linearly; the gap
d(p) = min(d_0 + d_slope * p, d_max); the teacher ratio r_t = max(r_s - d(p), 0).

Layer Consistency Distillation (LCD, our design, documented as such): at a fixed target ratio, the student
compresses before layer l_s(p) = round(l_start - (l_start - K) * p), from deep (l_start = L - 1) to shallow (K); the
teacher at the deeper l_t = min(l_s + dl(p), L), dl growing from 1 to `gap_layers_max`, where L means "no
compression".

Both schedules take a `hold` (0 by default, as released): the ramps run over the first 1 - hold of training and
their end values hold for the last `hold`, e.g. hold = 0.3 trains at the target from 70% of the run on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenSchedule:
    """Linear ramps of the student's ratio range and of the teacher gap (all values are drop ratios)."""

    r_min_start: float = 0.1
    r_min_end: float = 0.26
    r_max_start: float = 0.1
    r_max_end: float = 0.74
    gap_start: float = 0.1
    gap_slope: float = 0.5
    gap_max: float = 0.3
    hold: float = 0.0  # the last fraction of training at the end values

    def __post_init__(self) -> None:
        _check_hold(self.hold)
        for name in ("r_min_start", "r_min_end", "r_max_start", "r_max_end"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value}")
        if self.r_min_start > self.r_max_start or self.r_min_end > self.r_max_end:
            raise ValueError(
                f"the student's ratio range is empty: R_min runs {self.r_min_start}->{self.r_min_end}, "
                f"R_max {self.r_max_start}->{self.r_max_end}"
            )
        if self.r_max_end < self.r_max_start or self.r_min_end < self.r_min_start:
            raise ValueError("the ratio schedule ends before it starts: compression must not decrease over training")
        if self.gap_start < 0 or self.gap_max < 0 or self.gap_slope < 0:
            raise ValueError(
                f"the teacher must be milder than the student: gap_start={self.gap_start}, "
                f"gap_slope={self.gap_slope}, gap_max={self.gap_max} must be >= 0"
            )

    def ratio_range(self, progress: float) -> tuple[float, float]:
        progress = _ramp(progress, self.hold)
        low = self.r_min_start + (self.r_min_end - self.r_min_start) * progress
        high = self.r_max_start + (self.r_max_end - self.r_max_start) * progress
        return low, high

    def gap(self, progress: float) -> float:
        return min(self.gap_start + self.gap_slope * _ramp(progress, self.hold), self.gap_max)

    def sample(self, progress: float, generator: torch.Generator) -> tuple[float, float]:
        """(student ratio, teacher ratio) at `progress`."""
        low, high = self.ratio_range(progress)
        student = low + (high - low) * torch.rand((), generator=generator).item()
        return student, max(student - self.gap(progress), 0.0)


def released_token_schedule() -> TokenSchedule:
    """The released EPIC code: R_min = 0.1 + 0.16p, R_max = 0.1 + 0.64p, d = min(0.1 + 0.5p, 0.3).

    Its ramp stops at 0.74 (about 148 of 576 tokens), although its comments aim at 0.9.
    """
    return TokenSchedule()


def target_token_schedule(target_ratio: float, start: float = 0.1) -> TokenSchedule:
    """Our default: the released shape (R_min rising at a quarter of R_max's slope), scaled so R_max reaches the
    run's target ratio at the end (0.889 for 64 of 576 tokens)."""
    if not start <= target_ratio < 1.0:
        raise ValueError(f"target ratio must lie in [{start}, 1), got {target_ratio}")
    span = target_ratio - start
    return TokenSchedule(r_min_start=start, r_min_end=start + 0.25 * span, r_max_start=start, r_max_end=target_ratio)


@dataclass(frozen=True)
class LayerSchedule:
    """The compression layer moving from deep to shallow; the teacher compresses deeper (or not at all)."""

    num_layers: int
    final_layer: int = 2  # K, reached at the end
    start_layer: int | None = None  # default num_layers - 1
    gap_layers_max: int = 2
    hold: float = 0.0  # the last fraction of training at layer K

    def __post_init__(self) -> None:
        _check_hold(self.hold)
        start = self.first_layer
        if not 1 <= self.final_layer < self.num_layers:
            raise ValueError(f"final_layer must lie in [1, {self.num_layers - 1}], got {self.final_layer}")
        if not 1 <= start < self.num_layers:
            raise ValueError(f"start_layer must lie in [1, {self.num_layers - 1}], got {start}")
        if start < self.final_layer:
            raise ValueError(
                f"the layer schedule ends before it starts: it must move from deep to shallow, "
                f"got start_layer={start} < final_layer={self.final_layer}"
            )
        if self.gap_layers_max < 1:
            raise ValueError(f"the teacher must be milder than the student: gap_layers_max={self.gap_layers_max} < 1")

    @property
    def first_layer(self) -> int:
        return self.num_layers - 1 if self.start_layer is None else self.start_layer

    def layers(self, progress: float) -> tuple[int, int]:
        """(student layer, teacher layer) at `progress`; a teacher layer of `num_layers` means no compression."""
        progress = _ramp(progress, self.hold)
        student = round(self.first_layer - (self.first_layer - self.final_layer) * progress)
        gap = round(1 + (self.gap_layers_max - 1) * progress)
        return student, min(student + gap, self.num_layers)


def _check_progress(progress: float) -> float:
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must lie in [0, 1], got {progress}")
    return progress


def _check_hold(hold: float) -> None:
    if not 0.0 <= hold < 1.0:
        raise ValueError(f"hold (the last fraction of training at the schedule's end) must lie in [0, 1), got {hold}")


def _ramp(progress: float, hold: float) -> float:
    """Progress along a ramp that ends at 1 - hold of training and then stays at its end."""
    return min(_check_progress(progress) / (1.0 - hold), 1.0)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): resuming at a step redraws the same values."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_033 + stream) % (2**63 - 1))
