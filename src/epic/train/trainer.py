"""`EpicTrainer`: HF `Trainer` with EPIC's consistency distillation in one `compute_loss`.

One model, shared weights. Per micro-step: the vision tower and projector run once; the student pass runs with
gradients under stronger compression and records what enters its compression layer; the teacher resumes from there
under `torch.no_grad()` with milder compression (or none), so the layers below are computed once for both. Logits
are projected only at the positions whose next label is supervised (the engine maps them through original positions,
so teacher and student rows are aligned), where CE (student) and KL (fp32) are computed.
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
from epic.distill import KD_MODES, Curriculum, StepPlan, plan_step
from epic.models.factory import chat_template_for_saving, write_template
from epic.train.kd import LlavaKDLoss
from epic.train.step import ConsistencyLoss

COMPLETE_MARKER = ".complete"


def llava_of(model: nn.Module) -> nn.Module:
    """The `LlavaForConditionalGeneration` inside DDP / DeepSpeed / peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class EpicTrainer(Trainer):
    """Trainer for `sft`, `tcd`, `lcd`, `tcd+lcd` (see `epic.distill.Curriculum`) and, given a `teacher` and `kd`,
    the LLaVA-KD modes `kd-pretrain`, `kd-finetune` and `kd-tcd`.

    The teacher is a plain attribute, not a submodule of the trained model: the optimizer, DDP and DeepSpeed never
    see it, and checkpoints hold the student only.
    """

    def __init__(
        self,
        *args: Any,
        curriculum: Curriculum,
        method: str,
        method_options: dict[str, Any],
        alpha: float,
        temperature: float,
        compression_seed: int,
        template: str,
        projector_lr: float | None = None,
        group_by_modality_length: bool = True,
        teacher: nn.Module | None = None,
        kd: LlavaKDLoss | None = None,
        **kwargs: Any,
    ) -> None:
        check_trainer_overrides(Trainer)  # the private methods overridden below still exist, with these parameters
        super().__init__(*args, **kwargs)
        if (teacher is None) != (kd is None) or (kd is not None) != (curriculum.mode in KD_MODES):
            raise ValueError(f"mode {curriculum.mode!r}: a teacher and a KD loss go together, with the kd-* modes only")
        self.teacher = teacher
        self.kd = kd
        self._images_in_batch: torch.Tensor | None = None  # images of the accumulated batch (all ranks), for KD
        self.curriculum = curriculum
        self.consistency = ConsistencyLoss(method, method_options, alpha, temperature)
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
        llava = llava_of(model)
        plan, seed = self._step_plan()
        if self.curriculum.mode == "sft":
            if plan.student_compresses:
                self._student = self.consistency.attach(llava, plan.student_ratio, plan.student_layer, seed)
            extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            outputs = model(**inputs, **extra)
            rows = int((inputs["labels"][:, 1:] != -100).sum())
            local = float(num_items_in_batch) / max(rows, 1) if num_items_in_batch is not None else 1.0
            self._record(plan, ce=outputs.loss.item() * local)  # logged as this micro-batch's mean
            loss = self._scale_for_devices(outputs.loss, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

        if self.kd is not None:
            return self._kd_loss(model, llava, inputs, plan, seed, return_outputs, num_items_in_batch)
        result = self.consistency(model, llava, inputs, plan, seed, num_items_in_batch)
        self._student, loss, ce, kd = result.student, result.loss, result.ce, result.kd
        local = float(num_items_in_batch) / max(result.rows, 1) if num_items_in_batch is not None else 1.0
        losses = {"ce": ce.item() * local} | ({"kd": kd.item() * local} if self.consistency.alpha > 0 else {})
        self._record(plan, **losses)  # logged as this micro-batch's means (no KD without a teacher pass)
        loss = self._scale_for_devices(loss, num_items_in_batch)
        return (loss, {"logits": result.student_rows}) if return_outputs else loss

    def _kd_loss(
        self,
        model: nn.Module,
        llava: nn.Module,
        inputs: dict[str, torch.Tensor],
        plan: StepPlan,
        seed: int,
        return_outputs: bool,
        num_items_in_batch: torch.Tensor | int | None,
    ):
        """LLaVA-KD: token parts divided by the accumulated batch's token count, image parts by its image count."""
        num_images = None if num_items_in_batch is None else self._images_in_batch
        with self.accelerator.autocast():  # the student's visual rows are projected outside its forward
            result = self.kd(model, llava, self.teacher, inputs, plan, seed, num_items_in_batch, num_images)
        self._student = result.student
        tokens = float(num_items_in_batch) / max(result.rows, 1) if num_items_in_batch is not None else 1.0
        losses = {"ce": result.ce.item() * tokens, "res": result.response.item() * tokens}
        if result.images:  # logged as this micro-batch's means; a micro-batch without images has no image parts
            images = float(num_images) / result.images if num_images is not None else 1.0
            losses.update(vis=result.visual.item() * images, rel=result.relation.item() * images)
        self._record(plan, **losses)
        loss = self._scale_for_devices(result.loss, num_items_in_batch)
        return (loss, {"logits": result.student_rows}) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """Also counts the images of the accumulated batch (across ranks when tokens are), for the KD image parts."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.kd is not None:
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
    def _record(self, plan: StepPlan, **losses: float) -> None:
        metrics = self._metrics
        for name, value in losses.items():
            metrics[f"{name}_loss"].append(value)
        if plan.student_ratio is not None:
            metrics["student_ratio"].append(plan.student_ratio)
        if plan.teacher_ratio is not None and self.curriculum.mode != "sft":
            metrics["teacher_ratio"].append(plan.teacher_ratio)
            metrics["gap"].append(plan.student_ratio - plan.teacher_ratio)
        if "lcd" in self.curriculum.mode:
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
