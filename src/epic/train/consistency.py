"""EPIC's consistency step (TCD, LCD, TCD+LCD): the model distils from itself under milder compression.

L = alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE(student), at the supervised-next positions
(`epic.distill.ce_rows`, `kl_rows`). One model, shared weights: the vision tower and projector run once; the student
pass runs with gradients under stronger compression and records what enters its compression layer; the teacher
resumes from there under `torch.no_grad()` with milder compression (or none), so the layers below are computed once
for both. Logits are projected only at the supervised-next positions (the engine maps them through original
positions, so teacher and student rows are aligned).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from epic.compression import Compression, run_suffix
from epic.distill import ce_rows, kl_rows
from epic.distill.modes import StepKind
from epic.train.step import Compressor, Part, StepContext, StepOutput, removed_on_error, supervised_rows


@dataclass(frozen=True)
class ConsistencyStep:
    """The consistency step at weight `alpha` and temperature `temperature`; alpha = 0 runs no teacher pass.
    The teacher compresses with `teacher_compressor` (None: the student's method)."""

    kind: ClassVar[StepKind] = "consistency"
    counts_images: ClassVar[bool] = False
    compressor: Compressor
    alpha: float
    temperature: float = 1.0
    teacher_compressor: Compressor | None = None

    def __call__(self, model: nn.Module, inputs: dict[str, torch.Tensor], context: StepContext) -> StepOutput:
        """Vision once; the student pass (gradients, stronger compression, prefix recorded); the teacher resumed
        from that prefix under no_grad; CE and KL in fp32 on the aligned rows only. Both passes run their last
        layer's MLP at the supervised positions only."""
        llava = context.llava
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        wanted, targets = supervised_rows(inputs["labels"])
        student = self.compressor.student(context, for_consistency=True)  # before the vision tower: VisionZip reads it
        with removed_on_error(student):
            if inputs.get("pixel_values") is not None:
                config = llava.config
                features = llava.model.get_image_features(
                    pixel_values=inputs["pixel_values"],
                    vision_feature_layer=config.vision_feature_layer,
                    vision_feature_select_strategy=config.vision_feature_select_strategy,
                    return_dict=True,
                )
                forward["mm_encoder_outputs"] = {"image": features}  # computed once, fed to both passes
            student_rows = model(**forward, logits_to_keep=wanted).logits  # [N, V]
            teacher_rows = None
            if self.alpha > 0:  # alpha = 0 (progression without distillation): no teacher pass at all
                with torch.no_grad():
                    teacher_rows = self._teacher_rows(context, forward, wanted, student)
        ce = ce_rows(student_rows, targets, context.num_items)
        kd = ce.new_zeros(())
        if teacher_rows is not None:
            kd = kl_rows(student_rows, teacher_rows, self.temperature, context.num_items)
        loss = self.alpha * kd + (1 - self.alpha) * ce
        rows = targets.numel()
        parts = {"ce": Part(ce, rows, context.num_items)}
        if self.alpha > 0:  # no KD part without a teacher pass
            parts["kd"] = Part(kd, rows, context.num_items)
        return StepOutput(loss, parts, {"logits": student_rows}, student)

    def _teacher_rows(
        self,
        context: StepContext,
        forward: dict[str, Any],
        wanted: torch.Tensor,
        student: Compression | None,
    ) -> torch.Tensor:
        """The teacher's logits [N, V] at the `wanted` positions, with its milder compression (or none).

        The layers below the student's compression layer compute the same thing for both, so the teacher resumes
        from what the student recorded entering that layer; without a record (a text-only batch) it runs whole.
        """
        llava, plan = context.llava, context.plan
        teacher = None
        if plan.teacher_compresses:
            compressor = self.teacher_compressor or self.compressor
            teacher = compressor.attach(llava, plan.teacher_ratio, plan.teacher_layer, context.seed)
        try:
            if student is None:
                return llava(**forward, logits_to_keep=wanted).logits
            with student.paused():
                if student.prefix is None:
                    return llava(**forward, logits_to_keep=wanted).logits
                return run_suffix(llava, student.prefix, student.layer, wanted, teacher)
        finally:
            if teacher is not None:
                teacher.remove()
