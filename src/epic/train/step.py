"""The training-step protocol shared by SFT, consistency (TCD/LCD) and LLaVA-KD steps, and the SFT step.

A step runs the forwards of one micro-batch and returns its loss with the named parts to log. `EpicTrainer` calls
whichever step the mode names (`epic.distill.modes`) and does what every mode shares: the rescale of the logged parts
to micro-batch means, the logging, the device scaling of the loss, and removing the student's compression after
backward. `benchmarks/train_step.py` and `benchmarks/kd_step.py` call the same steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from epic.compression import Compression, compress
from epic.compression.stages import staged
from epic.distill import StepPlan, distilled_positions
from epic.distill.modes import StepKind

Count = torch.Tensor | int | None  # a count over the accumulated batch (all ranks when averaged), or None


@dataclass(frozen=True)
class StepContext:
    """What a step needs beside the model and the batch.

    `llava` is the LLaVA inside `model`'s wrappers (DDP, DeepSpeed, peft); `seed` seeds the method's own draws;
    `num_items` is the Trainer's count of supervised tokens in the accumulated batch and `num_images` its image count
    (None: each micro-batch is normalised by its own counts); `autocast` is the accelerator's autocast, for the
    modules a step calls outside the wrapped model's forward.
    """

    llava: nn.Module
    plan: StepPlan
    seed: int
    num_items: Count = None
    num_images: Count = None
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext


@dataclass(frozen=True)
class Part:
    """One named part of a step's loss: its `value` as normalised in the loss (a sum divided by `total`, the
    accumulated batch's count, or the mean over this micro-batch when `total` is None) and `count`, this
    micro-batch's own count of the same thing (supervised rows or images)."""

    value: torch.Tensor  # a scalar
    count: int
    total: Count

    def micro_batch_mean(self) -> float:
        """The part as this micro-batch's mean, whatever the loss was normalised by (what the logs show)."""
        scale = float(self.total) / max(self.count, 1) if self.total is not None else 1.0
        return self.value.item() * scale


@dataclass
class StepOutput:
    """A step's result: `loss` for backward, the `parts` to log (in logging order), `outputs` for the Trainer's
    `return_outputs`, and the student's compression, still attached: remove it after backward (gradient
    checkpointing recomputes under it)."""

    loss: torch.Tensor
    parts: dict[str, Part]
    outputs: Any
    student: Compression | None = None


class TrainingStep(Protocol):
    """One micro-batch's forwards and loss. `kind` names the step a mode asks for (`TrainingMode.step`);
    `counts_images` asks the trainer for the accumulated batch's image count (`StepContext.num_images`)."""

    kind: ClassVar[StepKind]
    counts_images: ClassVar[bool]

    def __call__(self, model: nn.Module, inputs: dict[str, torch.Tensor], context: StepContext) -> StepOutput: ...


@dataclass(frozen=True)
class Compressor:
    """A compression method with its options, attached at a plan's ratio and layer."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    later_stages: tuple[tuple[int, float], ...] = ()  # (layer, fraction of the stage before's kept tokens dropped)

    def attach(
        self, llava: nn.Module, ratio: float, layer: int, seed: int, for_consistency: bool = False
    ) -> Compression:
        """The method at `ratio` before decoder layer `layer`, then at each later stage. For the consistency student
        (`for_consistency`) it records what enters that layer (the teacher resumes from there) and runs the last
        layer's MLP at the supervised positions only (the only logits it uses)."""
        where: dict[str, Any] = {"ratio": ratio, "layer": layer}
        if self.later_stages:
            where = {"stages": staged(layer, ratio, self.later_stages)}
        return compress(
            llava,
            self.method,
            **where,
            seed=seed,
            record_prefix=for_consistency,
            trim_last_layer=for_consistency,
            **self.options,
        )

    def student(self, context: StepContext, for_consistency: bool = False) -> Compression | None:
        """The student's compression as the plan says, or None when it sees every token."""
        plan = context.plan
        if not plan.student_compresses:
            return None
        return self.attach(context.llava, plan.student_ratio, plan.student_layer, context.seed, for_consistency)


@contextmanager
def removed_on_error(student: Compression | None) -> Iterator[None]:
    """Detach the student's compression if the step fails; on success it stays attached for backward."""
    try:
        yield
    except BaseException:
        if student is not None:
            student.remove()
        raise


def supervised_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(wanted [B, L] bool: the positions whose logits predict a supervised label, targets [N]: those labels)."""
    wanted = distilled_positions(labels)  # logits at t predict labels[t + 1]
    return wanted, labels[:, 1:][wanted[:, :-1]]


@dataclass(frozen=True)
class SftStep:
    """Cross-entropy of the model's own forward (labels inside it), compressed at the plan's fixed ratio if any."""

    kind: ClassVar[StepKind] = "sft"
    counts_images: ClassVar[bool] = False
    compressor: Compressor

    def __call__(self, model: nn.Module, inputs: dict[str, torch.Tensor], context: StepContext) -> StepOutput:
        student = self.compressor.student(context)
        extra = {} if context.num_items is None else {"num_items_in_batch": context.num_items}
        with removed_on_error(student):
            outputs = model(**inputs, **extra)
        rows = supervised_rows(inputs["labels"])[1].numel()
        return StepOutput(outputs.loss, {"ce": Part(outputs.loss, rows, context.num_items)}, outputs, student)
