"""Distillation: schedules and losses as pure functions (nothing here knows about training loops)."""

from epic.distill.curriculum import Curriculum, StepPlan, plan_step
from epic.distill.llava_kd import (
    image_positions,
    relation_loss,
    relation_rows,
    shared_columns,
    visual_kd_loss,
    visual_kd_rows,
)
from epic.distill.losses import ce_rows, distilled_positions, kd_loss, kl_per_row, kl_rows
from epic.distill.modes import MODES, TRAINING_MODES, TrainingMode, training_mode
from epic.distill.schedules import (
    LayerSchedule,
    TokenSchedule,
    released_token_schedule,
    step_generator,
    target_token_schedule,
)

__all__ = [
    "MODES",
    "TRAINING_MODES",
    "Curriculum",
    "LayerSchedule",
    "StepPlan",
    "TokenSchedule",
    "TrainingMode",
    "ce_rows",
    "distilled_positions",
    "image_positions",
    "kd_loss",
    "kl_per_row",
    "kl_rows",
    "plan_step",
    "relation_loss",
    "relation_rows",
    "released_token_schedule",
    "shared_columns",
    "step_generator",
    "target_token_schedule",
    "training_mode",
    "visual_kd_loss",
    "visual_kd_rows",
]
