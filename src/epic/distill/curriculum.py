"""What each training step compresses, per mode: a pure function of progress and a step generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epic.distill.modes import TrainingMode, training_mode
from epic.distill.schedules import LayerSchedule, TokenSchedule, step_generator


@dataclass(frozen=True)
class StepPlan:
    """Compression of one micro-step. A ratio of None or a layer equal to `num_layers` means no compression.

    A ratio of 0 still attaches the method (keeping every token): every rank then calls the same modules in the
    same order whatever it drew, which DeepSpeed ZeRO-3 needs (it gathers weights per module call).
    """

    student_ratio: float | None
    student_layer: int
    teacher_ratio: float | None
    teacher_layer: int
    num_layers: int

    @property
    def student_compresses(self) -> bool:
        return self.student_ratio is not None and self.student_layer < self.num_layers

    @property
    def teacher_compresses(self) -> bool:
        return self.teacher_ratio is not None and self.teacher_layer < self.num_layers


@dataclass(frozen=True)
class Curriculum:
    """The mode's schedules: `sft` (optionally a fixed ratio), `tcd` (ratio schedule, teacher gap), `lcd` (layer
    schedule at the target ratio) or `tcd+lcd` (both).

    The LLaVA-KD modes distil from a separate teacher model that always sees every token (its plan says no
    compression): `kd-pretrain` and `kd-finetune` train the student at full tokens, `kd-tcd` compresses the student
    on the TCD ratio schedule (the schedule's teacher ratio is not used).
    """

    mode: str
    num_layers: int
    layer: int
    target_ratio: float | None
    tokens: TokenSchedule | None = None
    layers: LayerSchedule | None = None

    def __post_init__(self) -> None:
        mode = training_mode(self.mode)
        if not 0 <= self.layer < self.num_layers:
            raise ValueError(
                f"layer must lie in [0, {self.num_layers - 1}] (0: before the LLM) for {self.num_layers} layers, "
                f"got {self.layer}"
            )
        if self.target_ratio is not None and not 0.0 <= self.target_ratio < 1.0:
            raise ValueError(f"the target ratio must lie in [0, 1), got {self.target_ratio}")
        if mode.budget == "refused" and self.target_ratio is not None:
            raise ValueError(
                f"mode {self.mode!r} trains the student at full tokens; for a compressed student use kd-tcd"
            )
        if mode.budget == "required" and self.target_ratio is None:
            raise ValueError(f"mode {self.mode!r} needs a target budget: set tokens or ratio")
        if mode.token_schedule and self.tokens is None:
            raise ValueError(f"mode {self.mode!r} needs a token schedule")
        if mode.layer_schedule and self.layers is None:
            raise ValueError(f"mode {self.mode!r} needs a layer schedule")

    @property
    def training_mode(self) -> TrainingMode:
        """What the mode enables (`epic.distill.modes.TRAINING_MODES`)."""
        return training_mode(self.mode)

    def step(self, progress: float, generator: torch.Generator) -> StepPlan:
        mode = self.training_mode
        student_ratio = teacher_ratio = self.target_ratio
        student_layer = teacher_layer = self.layer
        if mode.token_schedule:
            student_ratio, teacher_ratio = self.tokens.sample(progress, generator)
        if mode.step != "consistency":  # only the consistency step has a compressed teacher pass
            teacher_ratio, teacher_layer = None, self.num_layers
        if mode.layer_schedule:
            student_layer, teacher_layer = self.layers.layers(progress)
        return StepPlan(student_ratio, student_layer, teacher_ratio, teacher_layer, self.num_layers)


def plan_step(curriculum: Curriculum, seed: int, step: int, max_steps: int, stream: int = 0) -> tuple[StepPlan, int]:
    """(the plan, the seed of the method's own draws) of optimizer step `step` of `max_steps`, micro-batch
    `stream`: what the trainer compresses there, and what a replay of the run recomputes exactly."""
    generator = step_generator(seed, step, stream)
    method_seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))  # for Random's own draws
    return curriculum.step(min(step / max(max_steps, 1), 1.0), generator), method_seed
