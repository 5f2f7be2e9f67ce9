"""The LLaVA-KD step (SPEC section 3), shared by `EpicTrainer` and `benchmarks/kd_step.py`; `kd-tcd` is the same
step with the student compressed on TCD's ratio schedule (its plan), nothing more.

L = CE + a * L_res + b * L_vis + c * L_rel (`epic.distill.llava_kd`). The student runs once with gradients and
projects logits only where they are used: the LM head runs inside the forward at the response positions (a boolean
`logits_to_keep`) and once more, outside, on the final hidden states of the visual positions it kept. The teacher is
a separate frozen model that sees every token; it runs under `torch.inference_mode()` and projects exactly the rows
the student has, so the two come back aligned by original position.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from epic.compression import Compression
from epic.distill import ce_rows, kl_rows, relation_rows, shared_columns, visual_kd_rows
from epic.distill.modes import StepKind
from epic.train.step import Compressor, Part, StepContext, StepOutput, removed_on_error, supervised_rows

KD_WEIGHT_PRESETS = ("released", "paper")


@dataclass(frozen=True)
class KDWeights:
    """a, b, c in L = CE + a * L_res + b * L_vis + c * L_rel."""

    response: float = 1.0
    visual: float = 1.0
    relation: float = 1.0

    def __post_init__(self) -> None:
        if min(self.response, self.visual, self.relation) < 0:
            raise ValueError(f"KD weights must be >= 0, got {self}")


def kd_weights(
    preset: str = "released",
    response: float | None = None,
    visual: float | None = None,
    relation: float | None = None,
) -> KDWeights:
    """A preset, `released` (1, 1, 1: the released code) or `paper` (RDist at 0.5, as the paper suggests), with any
    weight overridden."""
    if preset not in KD_WEIGHT_PRESETS:
        raise ValueError(f"unknown KD weight preset {preset!r}; choose one of {KD_WEIGHT_PRESETS}")
    base = KDWeights(relation=0.5) if preset == "paper" else KDWeights()
    return KDWeights(
        base.response if response is None else response,
        base.visual if visual is None else visual,
        base.relation if relation is None else relation,
    )


@contextmanager
def _final_hidden_states(llava: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the output of the LLM's final norm ([B, L', d], in the compressed sequence's slots)."""
    captured: list[torch.Tensor] = []
    handle = llava.model.language_model.norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


@dataclass(frozen=True)
class KDStep:
    """L = CE + a * L_res + b * L_vis + c * L_rel against `teacher`, a separate frozen LLaVA that sees every token
    (a plain attribute: the optimizer, DDP and DeepSpeed never see it, checkpoints hold the student only).

    `vocab_size` is `len(tokenizer)`: logits are compared on those columns only. `compressor` compresses the student
    when the plan says so (`kd-tcd`). Token parts are divided by the accumulated batch's token count, image parts by
    its image count.
    """

    kind: ClassVar[StepKind] = "kd"
    counts_images: ClassVar[bool] = True
    teacher: nn.Module
    weights: KDWeights
    vocab_size: int
    compressor: Compressor

    def __call__(self, model: nn.Module, inputs: dict[str, torch.Tensor], context: StepContext) -> StepOutput:
        """One step's loss, under the accelerator's autocast (the student's visual rows are projected outside its
        forward). The teacher needs the student's tokenizer and visual-token count (`epic.train.teacher`).

        Rows without an image contribute CE and L_res only. L_vis and L_rel cover every image of every row: all its
        positions, or the ones the student kept when it is compressed (the teacher's rows at the same positions).
        """
        with context.autocast():
            return self._step(model, inputs, context)

    def _step(self, model: nn.Module, inputs: dict[str, torch.Tensor], context: StepContext) -> StepOutput:
        llava, num_items, num_images = context.llava, context.num_items, context.num_images
        input_ids = inputs["input_ids"]
        forward = {"input_ids": input_ids, "attention_mask": inputs["attention_mask"]}
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            forward["pixel_values"] = pixel_values
        response, targets = supervised_rows(inputs["labels"])  # [B, L], [N]
        image_mask = input_ids == llava.config.image_token_id
        images = 0 if pixel_values is None else pixel_values.shape[0]
        student = self.compressor.student(context)
        with removed_on_error(student):
            with _final_hidden_states(llava) as hidden:
                student_response = model(**forward, logits_to_keep=response).logits
            slots = self._slot_positions(student, input_ids)  # [B, L'] original position of each slot (-1: filler)
            visual_slots = (slots >= 0) & image_mask.gather(1, slots.clamp(min=0))
            # every rank projects (maybe zero) visual rows, so all call the same modules in the same order (ZeRO-3)
            student_visual = llava.get_output_embeddings()(hidden[-1][visual_slots])
            visual = torch.zeros_like(image_mask)
            visual[visual_slots.nonzero()[:, 0], slots[visual_slots]] = True  # kept visual positions, original coords
            taught = response | visual  # the teacher's rows, in row-major order
            teacher_rows = self._teacher_rows(forward, taught)
        is_response, is_visual = response[taught], visual[taught]  # which teacher rows are which (maybe both)
        ce = ce_rows(student_response, targets, num_items)
        student_rows, teacher_res = shared_columns(student_response, teacher_rows[is_response], self.vocab_size)
        res = kl_rows(student_rows, teacher_res, 1.0, num_items)
        per_image = student_visual.shape[0] // images if images else 1
        student_vis, teacher_vis = shared_columns(student_visual, teacher_rows[is_visual], self.vocab_size)
        vis = visual_kd_rows(student_vis, teacher_vis, per_image, num_images)
        rel = relation_rows(student_vis, teacher_vis, per_image, num_images)
        weights = self.weights
        loss = ce + weights.response * res + weights.visual * vis + weights.relation * rel
        rows = targets.numel()
        parts = {"ce": Part(ce, rows, num_items), "res": Part(res, rows, num_items)}
        if images:  # a micro-batch without images has no image parts
            parts |= {"vis": Part(vis, images, num_images), "rel": Part(rel, images, num_images)}
        return StepOutput(loss, parts, {"logits": student_response}, student)

    @staticmethod
    def _slot_positions(student: Compression | None, input_ids: torch.Tensor) -> torch.Tensor:
        if student is not None and student.original_positions is not None:
            return student.original_positions.to(input_ids.device)
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def _teacher_rows(self, forward: dict[str, torch.Tensor], wanted: torch.Tensor) -> torch.Tensor:
        """The teacher's logits [N, V_t] at the `wanted` positions, in fp32, outside the autograd graph."""
        dtype = next(self.teacher.parameters()).dtype
        inputs = {key: value.to(dtype) if key == "pixel_values" else value for key, value in forward.items()}
        with torch.inference_mode():
            rows = self.teacher(**inputs, logits_to_keep=wanted).logits
        return rows.to(torch.float32, copy=True)  # a normal tensor (inference tensors cannot join autograd)
