"""The training modes users name (`--mode`), each with what it enables: one table instead of tests on the name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

StepKind = Literal["sft", "consistency", "kd"]
BudgetRule = Literal["optional", "required", "refused"]


@dataclass(frozen=True)
class TrainingMode:
    """What one mode enables.

    `step`: the training step that runs: `sft` (CE alone), `consistency` (EPIC: the model distils from itself under
    milder compression) or `kd` (LLaVA-KD: a separate, larger teacher model that sees every token).
    `token_schedule`: TCD's ratio schedule draws the student's compression each step (and, for `consistency`, the
    teacher's); `kd-tcd` uses it for the student alone. `layer_schedule`: LCD's schedule moves the compression layer.
    `budget`: whether a target budget (`tokens` or `ratio`) may, must or must not be given.
    `projector_only`: the stage trains the projector alone (LLaVA-KD's distilled pre-training).
    """

    name: str
    step: StepKind
    token_schedule: bool = False
    layer_schedule: bool = False
    budget: BudgetRule = "required"
    projector_only: bool = False

    @property
    def needs_teacher_model(self) -> bool:
        """A separate teacher checkpoint (`--teacher`) is loaded."""
        return self.step == "kd"


TRAINING_MODES: dict[str, TrainingMode] = {
    mode.name: mode
    for mode in (
        TrainingMode("sft", "sft", budget="optional"),  # a budget compresses at a fixed ratio
        TrainingMode("tcd", "consistency", token_schedule=True),
        TrainingMode("lcd", "consistency", layer_schedule=True),
        TrainingMode("tcd+lcd", "consistency", token_schedule=True, layer_schedule=True),
        TrainingMode("kd-pretrain", "kd", budget="refused", projector_only=True),
        TrainingMode("kd-finetune", "kd", budget="refused"),
        TrainingMode("kd-tcd", "kd", token_schedule=True),
    )
}
MODES = tuple(TRAINING_MODES)  # the names, as recipes and the CLI spell them


def training_mode(name: str) -> TrainingMode:
    """The mode called `name`; an unknown name is one `ValueError` listing the known ones."""
    if name not in TRAINING_MODES:
        raise ValueError(f"unknown training mode {name!r}; choose one of {MODES}")
    return TRAINING_MODES[name]
