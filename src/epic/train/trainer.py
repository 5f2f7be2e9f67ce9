"""`EpicTrainer`: HF `Trainer` that runs one training step per micro-batch (`epic.train.step`): SFT, EPIC's
consistency distillation (`epic.train.consistency`) or LLaVA-KD (`epic.train.kd`), as the mode names.

The step runs the forwards and returns the loss and its parts; the trainer plans the step's compression (the
curriculum), logs the parts as micro-batch means, scales the loss for the devices, and removes the student's
compression after backward.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from epic.compat import check_trainer_overrides
from epic.compression import Compression
from epic.data.sampler import ModalityLengthGroupedSampler
from epic.distill import Curriculum, StepPlan, plan_step
from epic.models.factory import chat_template_for_saving, write_template
from epic.train.step import Part, StepContext, TrainingStep

COMPLETE_MARKER = ".complete"


def llava_of(model: nn.Module) -> nn.Module:
    """The `LlavaForConditionalGeneration` inside DDP / DeepSpeed / peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class EpicTrainer(Trainer):
    """Trainer for every mode of `epic.distill.modes`: `step` is the training step the curriculum's mode names
    (`SftStep` for `sft`, `ConsistencyStep` for `tcd`, `lcd`, `tcd+lcd`, `KDStep`, holding the teacher, for the
    `kd-*` modes)."""

    def __init__(
        self,
        *args: Any,
        curriculum: Curriculum,
        step: TrainingStep,
        compression_seed: int,
        template: str,
        projector_lr: float | None = None,
        group_by_modality_length: bool = True,
        **kwargs: Any,
    ) -> None:
        check_trainer_overrides(Trainer)  # the private methods overridden below still exist, with these parameters
        super().__init__(*args, **kwargs)
        expected = curriculum.training_mode.step
        if step.kind != expected:
            raise ValueError(f"mode {curriculum.mode!r} runs the {expected} step, not the {step.kind} step")
        self.step = step
        self._images_in_batch: torch.Tensor | None = None  # images of the accumulated batch (all ranks), for KD
        self.curriculum = curriculum
        self.compression_seed = compression_seed
        self.template = template
        self.projector_lr = projector_lr
        self.group_by_modality_length = group_by_modality_length
        self._student: Compression | None = None
        self._micro_step = (-1, 0)  # (global step, micro-steps seen in it)
        self._metrics: dict[str, list[float]] = defaultdict(list)

    # ------------------------------------------------------------------------------------------------ the step
    def _step_plan(self) -> tuple[StepPlan, int]:
        step = self.state.global_step
        micro = self._micro_step[1] + 1 if self._micro_step[0] == step else 0
        self._micro_step = (step, micro)
        stream = micro * self.args.world_size + self.args.process_index  # one stream per micro-batch of the step
        return plan_step(self.curriculum, self.compression_seed, step, self.state.max_steps, stream)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """The step's loss (normalised by the accumulated batch's counts), scaled for the devices; its parts are
        logged as this micro-batch's means."""
        plan, seed = self._step_plan()
        num_images = None if num_items_in_batch is None else self._images_in_batch
        context = StepContext(llava_of(model), plan, seed, num_items_in_batch, num_images, self.accelerator.autocast)
        output = self.step(model, inputs, context)
        self._student = output.student
        self._record(plan, output.parts)
        loss = self._scale_for_devices(output.loss, num_items_in_batch)
        return (loss, output.outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """Also counts the images of the accumulated batch (across ranks when tokens are), for the KD image parts."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.step.counts_images:
            images = sum(len(batch["pixel_values"]) for batch in batch_samples if "pixel_values" in batch)
            images = torch.tensor(images, device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                images = self.accelerator.gather(images).sum()
            self._images_in_batch = images
        return batch_samples, num_items_in_batch

    def _scale_for_devices(self, loss: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
        """As the Trainer's own `compute_loss`: a loss normalised by the token count of all ranks is multiplied by
        the number of ranks, since DDP averages gradients."""
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Keeps the student's compression attached through backward (gradient checkpointing recomputes under it)."""
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            if self._student is not None:
                self._student.remove()
                self._student = None

    # ------------------------------------------------------------------------------------------------ logging
    def _record(self, plan: StepPlan, parts: dict[str, Part]) -> None:
        metrics = self._metrics
        for name, part in parts.items():
            metrics[f"{name}_loss"].append(part.micro_batch_mean())
        if plan.student_ratio is not None:
            metrics["student_ratio"].append(plan.student_ratio)
        if plan.teacher_ratio is not None:  # the consistency teacher's ratio (the other steps plan none)
            metrics["teacher_ratio"].append(plan.teacher_ratio)
            metrics["gap"].append(plan.student_ratio - plan.teacher_ratio)
        if self.curriculum.training_mode.layer_schedule:
            metrics["student_layer"].append(plan.student_layer)
            metrics["teacher_layer"].append(plan.teacher_layer)
        student = self._student
        if student is not None and student.tokens_per_image:
            metrics["kept_tokens"].append(float(student.budget.resolve(student.tokens_per_image)))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._metrics:
            for name, values in self._metrics.items():
                logs[name] = round(sum(values) / len(values), 6)
            self._metrics.clear()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------ plumbing
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_modality_length or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(train_dataset)
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return ModalityLengthGroupedSampler(dataset.lengths, batch, self.args.world_size, seed=self.args.seed)

    def create_optimizer(self, model: nn.Module | None = None):
        """Like the Trainer's, with the projector at its own learning rate when `projector_lr` is set."""
        if self.projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = model if model is not None else self.model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[float, float], list[nn.Parameter]] = defaultdict(list)
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            lr = self.projector_lr if "multi_modal_projector" in name else self.args.learning_rate
            groups[(lr, self.args.weight_decay if name in decay else 0.0)].append(parameter)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(
            [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()],
            **optimizer_kwargs,
        )
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save as the Trainer does, the processor carrying the template's chat template, and `epic.json`."""
        with chat_template_for_saving(self.processing_class, self.template):
            super()._save(output_dir, state_dict)
        if self.args.should_save:
            write_template(Path(output_dir or self.args.output_dir), self.template)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Restore the weights through `from_pretrained`, which maps the saved key names back to the modules.

        (transformers 5 saves LLaVA weights under their original checkpoint names, `language_model.model.*`, which
        the Trainer's own `load_state_dict(..., strict=False)` does not map: it would silently restore nothing.)
        """
        model = model if model is not None else self.model
        target = llava_of(model)
        if target is not model and not hasattr(model, "module"):  # a peft model: adapters load through peft
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=next(target.parameters()).dtype)
        target.load_state_dict(loaded.state_dict(), strict=True)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Save, then mark the checkpoint complete: a run killed mid-save leaves an unmarked folder that
        `last_complete_checkpoint` skips."""
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank has written its part (RNG states, shards)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            marker = folder / COMPLETE_MARKER
            with open(marker, "w") as handle:
                handle.write("ok\n")
                handle.flush()
                os.fsync(handle.fileno())


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest `checkpoint-N` in `output_dir` whose save finished (it holds the completion marker)."""
    folders = [path for path in Path(output_dir).glob("checkpoint-*") if (path / COMPLETE_MARKER).is_file()]
    folders = [path for path in folders if path.name.split("-")[-1].isdigit()]
    return max(folders, key=lambda path: int(path.name.split("-")[-1]), default=None)
