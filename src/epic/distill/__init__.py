"""Distillation: schedules and losses as pure functions (nothing here knows about training loops)."""

from epic.distill.curriculum import MODES, Curriculum, StepPlan
from epic.distill.losses import ce_rows, distilled_positions, kd_loss, kl_rows
from epic.distill.schedules import (
    LayerSchedule,
    TokenSchedule,
    released_token_schedule,
    step_generator,
    target_token_schedule,
)

__all__ = [
    "MODES",
    "Curriculum",
    "LayerSchedule",
    "StepPlan",
    "TokenSchedule",
    "ce_rows",
    "distilled_positions",
    "kd_loss",
    "kl_rows",
    "released_token_schedule",
    "step_generator",
    "target_token_schedule",
]
