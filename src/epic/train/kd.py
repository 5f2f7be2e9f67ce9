"""One LLaVA-KD step (SPEC section 3), shared by `EpicTrainer` and `benchmarks/kd_step.py`, and the checks that a
teacher fits its student.

L = CE + a * L_res + b * L_vis + c * L_rel (`epic.distill.llava_kd`). The student runs once with gradients and
projects logits only where they are used: the LM head runs inside the forward at the response positions (a boolean
`logits_to_keep`) and once more, outside, on the final hidden states of the visual positions it kept. The teacher is
a separate frozen model that sees every token; it runs under `torch.inference_mode()` and projects exactly the rows
the student has, so the two come back aligned by original position.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from epic.compression import Compression, compress
from epic.data.dataset import image_token_count
from epic.distill import (
    StepPlan,
    ce_rows,
    distilled_positions,
    kl_rows,
    relation_rows,
    shared_columns,
    visual_kd_rows,
)

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


@dataclass
class KDResult:
    """The weighted loss and its parts, each as normalised in the loss (token sums / `num_items`, image sums /
    `num_images`); `rows` and `images` count this micro-batch's response rows and images."""

    loss: torch.Tensor
    ce: torch.Tensor
    response: torch.Tensor
    visual: torch.Tensor
    relation: torch.Tensor
    student: Compression | None  # still attached: remove it after backward()
    student_rows: torch.Tensor
    rows: int
    images: int


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
class LlavaKDLoss:
    """L = CE + a * L_res + b * L_vis + c * L_rel against a separate teacher that sees every token.

    `vocab_size` is `len(tokenizer)`: logits are compared on those columns only. `method` and `method_options`
    compress the student when the plan says so (`kd-tcd`).
    """

    weights: KDWeights
    vocab_size: int
    method: str = "dart"
    method_options: dict[str, Any] = field(default_factory=dict)

    def __call__(
        self,
        model: nn.Module,
        llava: nn.Module,
        teacher: nn.Module,
        inputs: dict[str, torch.Tensor],
        plan: StepPlan,
        seed: int,
        num_items: torch.Tensor | int | None = None,
        num_images: torch.Tensor | int | None = None,
    ) -> KDResult:
        """One step's loss. `model` is what the optimizer trains (maybe wrapped by DDP / DeepSpeed / peft), `llava`
        the LLaVA inside; `teacher` a frozen LLaVA with the same tokenizer and visual-token count.

        Rows without an image contribute CE and L_res only. L_vis and L_rel cover every image of every row: all its
        positions, or the ones the student kept when it is compressed (the teacher's rows at the same positions).
        """
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        forward = {"input_ids": input_ids, "attention_mask": inputs["attention_mask"]}
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            forward["pixel_values"] = pixel_values
        response = distilled_positions(labels)  # [B, L]: logits at t predict labels[t + 1]
        targets = labels[:, 1:][response[:, :-1]]
        image_mask = input_ids == llava.config.image_token_id
        images = 0 if pixel_values is None else pixel_values.shape[0]
        student = None
        if plan.student_compresses:
            student = compress(
                llava, self.method, ratio=plan.student_ratio, layer=plan.student_layer, seed=seed, **self.method_options
            )
        try:
            with _final_hidden_states(llava) as hidden:
                student_response = model(**forward, logits_to_keep=response).logits
            slots = self._slot_positions(student, input_ids)  # [B, L'] original position of each slot (-1: filler)
            visual_slots = (slots >= 0) & image_mask.gather(1, slots.clamp(min=0))
            # every rank projects (maybe zero) visual rows, so all call the same modules in the same order (ZeRO-3)
            student_visual = llava.get_output_embeddings()(hidden[-1][visual_slots])
            visual = torch.zeros_like(image_mask)
            visual[visual_slots.nonzero()[:, 0], slots[visual_slots]] = True  # kept visual positions, original coords
            taught = response | visual  # the teacher's rows, in row-major order
            teacher_rows = self._teacher_rows(teacher, forward, taught)
        except BaseException:
            if student is not None:
                student.remove()
            raise
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
        return KDResult(loss, ce, res, vis, rel, student, student_response, targets.numel(), images)

    @staticmethod
    def _slot_positions(student: Compression | None, input_ids: torch.Tensor) -> torch.Tensor:
        if student is not None and student.original_positions is not None:
            return student.original_positions.to(input_ids.device)
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    @staticmethod
    def _teacher_rows(teacher: nn.Module, forward: dict[str, torch.Tensor], wanted: torch.Tensor) -> torch.Tensor:
        """The teacher's logits [N, V_t] at the `wanted` positions, in fp32, outside the autograd graph."""
        dtype = next(teacher.parameters()).dtype
        inputs = {key: value.to(dtype) if key == "pixel_values" else value for key, value in forward.items()}
        with torch.inference_mode():
            rows = teacher(**inputs, logits_to_keep=wanted).logits
        return rows.to(torch.float32, copy=True)  # a normal tensor (inference tensors cannot join autograd)


# ---------------------------------------------------------------------------------------------------- teacher checks
TEACHER_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it, else fp32; or one of `TEACHER_DTYPES` by name."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in TEACHER_DTYPES:
        raise ValueError(f"unknown teacher_dtype {name!r}; choose auto or one of {sorted(TEACHER_DTYPES)}")
    return TEACHER_DTYPES[name]


def check_same_tokenizer(student: Any, teacher: Any) -> None:
    """Refuse two tokenizers whose vocabularies (token -> id, added tokens included) differ, naming the first id
    where they do: LLaVA-KD compares the two models' distributions token by token."""
    student_tokens = {index: token for token, index in student.get_vocab().items()}
    teacher_tokens = {index: token for token, index in teacher.get_vocab().items()}
    for index in sorted(student_tokens.keys() | teacher_tokens.keys()):
        if student_tokens.get(index) != teacher_tokens.get(index):
            raise ValueError(
                f"the teacher's tokenizer differs from the student's (LLaVA-KD needs one vocabulary): first at id "
                f"{index}, student {student_tokens.get(index)!r}, teacher {teacher_tokens.get(index)!r} "
                f"({len(student_tokens)} and {len(teacher_tokens)} tokens)"
            )


def check_visual_tokens(student: int, teacher: int) -> None:
    """Refuse a teacher that turns an image into another number of visual tokens than the student."""
    if student != teacher:
        raise ValueError(
            f"the teacher sees {teacher} visual tokens per image and the student {student}: LLaVA-KD needs the same "
            "vision tower and feature strategy in both (729 for SigLIP-so400m-384 with the 'full' strategy)"
        )


PIXEL_SETTINGS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")


def _pixel_setting(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def check_teacher(student: nn.Module, student_processor: Any, teacher_config: Any, teacher_processor: Any) -> None:
    """Everything the teacher must share with the student, read before the teacher's weights are loaded: the
    tokenizer, the image token, the visual-token count, the image size and the pixel normalisation (it is fed the
    student's pixel values)."""
    check_same_tokenizer(student_processor.tokenizer, teacher_processor.tokenizer)
    for name in PIXEL_SETTINGS:
        ours = _pixel_setting(getattr(student_processor.image_processor, name, None))
        theirs = _pixel_setting(getattr(teacher_processor.image_processor, name, None))
        if ours != theirs:
            raise ValueError(
                f"the teacher's image processor has {name}={theirs}, the student's {ours}: the teacher is fed the "
                "student's pixel values, so both must normalise images alike (the same vision tower)"
            )
    if student.config.image_token_id != teacher_config.image_token_id:
        raise ValueError(
            f"the teacher's image token id is {teacher_config.image_token_id}, the student's "
            f"{student.config.image_token_id}"
        )
    check_visual_tokens(image_token_count(student_processor), image_token_count(teacher_processor))
    student_size = student.config.vision_config.image_size
    if student_size != teacher_config.vision_config.image_size:
        raise ValueError(
            f"the teacher's vision tower reads {teacher_config.vision_config.image_size} px images, the student's "
            f"{student_size} px: the teacher is fed the student's pixel values"
        )
    vocab = len(student_processor.tokenizer)
    widths = (student.config.text_config.vocab_size, teacher_config.text_config.vocab_size)
    if vocab > min(widths):
        raise ValueError(f"the tokenizer has {vocab} tokens, more than the LM heads' {widths} (student, teacher)")
