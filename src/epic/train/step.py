"""One consistency-distillation step, shared by `EpicTrainer` and `benchmarks/train_step.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from epic.compression import Compression, compress, run_suffix
from epic.distill import StepPlan, ce_rows, distilled_positions, kl_rows


@dataclass
class StepResult:
    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    student: Compression | None  # still attached: remove it after backward()
    student_rows: torch.Tensor
    rows: int


@dataclass(frozen=True)
class ConsistencyLoss:
    """L = alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE(student), at the supervised-next positions."""

    method: str
    method_options: dict[str, Any]
    alpha: float
    temperature: float = 1.0

    def attach(self, llava: nn.Module, ratio: float, layer: int, seed: int, student: bool = False) -> Compression:
        """The method at `ratio` before decoder layer `layer`; a student's records what enters that layer (for the
        teacher) and runs its last layer's MLP at the supervised positions only (the only logits it uses)."""
        return compress(
            llava,
            self.method,
            ratio=ratio,
            layer=layer,
            seed=seed,
            record_prefix=student,
            trim_last_layer=student,
            **self.method_options,
        )

    def __call__(
        self,
        model: nn.Module,
        llava: nn.Module,
        inputs: dict[str, torch.Tensor],
        plan: StepPlan,
        seed: int,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> StepResult:
        """Vision once; the student pass (gradients, stronger compression, prefix recorded); the teacher resumed
        from that prefix under no_grad; CE and KL in fp32 on the aligned rows only. Both passes project logits, and
        run their last layer's MLP, at the supervised positions only.

        `model` is what the optimizer trains (maybe wrapped by DDP / DeepSpeed / peft); `llava` the LLaVA inside.
        """
        labels = inputs["labels"]
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if inputs.get("pixel_values") is not None:
            config = llava.config
            features = llava.model.get_image_features(
                pixel_values=inputs["pixel_values"],
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                return_dict=True,
            )
            forward["mm_encoder_outputs"] = {"image": features}  # computed once, fed to both passes
        wanted = distilled_positions(labels)  # [B, L]: logits at t predict labels[t + 1]
        targets = labels[:, 1:][wanted[:, :-1]]
        student = None
        if plan.student_compresses:
            student = self.attach(llava, plan.student_ratio, plan.student_layer, seed, student=True)
        try:
            student_rows = model(**forward, logits_to_keep=wanted).logits
            teacher_rows = None
            if self.alpha > 0:  # alpha = 0 (progression without distillation): no teacher pass at all
                with torch.no_grad():
                    teacher_rows = self._teacher_rows(llava, plan, seed, forward, wanted, student)
        except BaseException:
            if student is not None:
                student.remove()
            raise
        ce = ce_rows(student_rows, targets, num_items_in_batch)
        kd = ce.new_zeros(())
        if teacher_rows is not None:
            kd = kl_rows(student_rows, teacher_rows, self.temperature, num_items_in_batch)
        loss = self.alpha * kd + (1 - self.alpha) * ce
        return StepResult(loss, ce, kd, student, student_rows, targets.numel())

    def _teacher_rows(
        self,
        llava: nn.Module,
        plan: StepPlan,
        seed: int,
        forward: dict[str, Any],
        wanted: torch.Tensor,
        student: Compression | None,
    ) -> torch.Tensor:
        """The teacher's logits at the `wanted` positions, with its milder compression (or none).

        The layers below the student's compression layer compute the same thing for both, so the teacher resumes
        from what the student recorded entering that layer; without a record (a text-only batch) it runs whole.
        """
        teacher = self.attach(llava, plan.teacher_ratio, plan.teacher_layer, seed) if plan.teacher_compresses else None
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
