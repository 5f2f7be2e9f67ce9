"""`epic train`: build the model, check every option before any compute, train, save a plain checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, TrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from epic.compat import set_attention_implementation, whole_parameters
from epic.compression import Budget, build_method
from epic.compression.registry import check_stage
from epic.compression.stages import check_stages, staged
from epic.data.dataset import LlavaDataset, collate, image_token_count
from epic.data.shapes import SynthConfig, vocabulary_texts, write_synthetic
from epic.data.templates import get_template
from epic.distill import (
    TRAINING_MODES,
    Curriculum,
    LayerSchedule,
    TokenSchedule,
    released_token_schedule,
    target_token_schedule,
    training_mode,
)
from epic.distill.modes import StepKind
from epic.models.assemble import ADDITIONAL_TOKENS, assemble_llava, visual_tokens
from epic.models.factory import build_tiny_llava_with_processor, save_llava, saved_template
from epic.models.loading import load_llava_model
from epic.models.tiny import TinyLlavaSpec
from epic.train.config import SCHEDULES, DataArguments, DistillArguments, ModelArguments
from epic.train.consistency import ConsistencyStep
from epic.train.kd import KDStep
from epic.train.step import Compressor, SftStep, TrainingStep
from epic.train.teacher import check_teacher, check_visual_tokens, load_teacher, teacher_dtype
from epic.train.trainer import EpicTrainer, last_complete_checkpoint

logger = logging.getLogger(__name__)
LOG_FILE = "log_history.json"  # beside the final checkpoint: every logged loss and schedule value


def build_model(args: ModelArguments):
    """(model, processor, template name) from a checkpoint, from parts, or `tiny:<family>`."""
    if args.model and args.model.startswith("tiny:"):
        hidden = args.tiny_hidden_size
        spec = TinyLlavaSpec(
            text_model=args.model.split(":", 1)[1],
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_layers=args.tiny_layers,
            num_heads=4,
            num_kv_heads=2,
            image_size=args.tiny_image_size,
            patch_size=args.tiny_patch_size,
        )
        with whole_parameters():
            model, processor = build_tiny_llava_with_processor(
                vocabulary_texts(SynthConfig()), spec, attn_implementation=args.attn_implementation
            )
        return model, processor, args.template or "vicuna_v1"
    if args.model:
        model = load_llava_model(args.model, attn_implementation=args.attn_implementation).train()  # safetensors only
        processor = AutoProcessor.from_pretrained(args.model)
        return model, processor, args.template or saved_template(Path(args.model))
    if args.vision_tower and args.language_model:
        if not args.template:
            raise ValueError("a model assembled from parts needs --template (e.g. vicuna_v1)")
        model, processor = assemble_llava(args.vision_tower, args.language_model, args.projector)
        set_attention_implementation(model.config.text_config, args.attn_implementation)
        return model, processor, args.template
    raise ValueError("give --model (a checkpoint or tiny:<family>) or --vision_tower and --language_model")


def model_shape(args: ModelArguments) -> tuple[int, int]:
    """(decoder layers, visual tokens per image) read from configs only, to check the options before any weight
    is loaded; the processor's own count is checked again once the model exists."""
    if args.model and args.model.startswith("tiny:"):
        return args.tiny_layers, (args.tiny_image_size // args.tiny_patch_size) ** 2
    if args.model:
        config = AutoConfig.from_pretrained(args.model)
        return config.text_config.num_hidden_layers, visual_tokens(
            config.vision_config, config.vision_feature_select_strategy
        )
    if args.vision_tower and args.language_model:
        vision = AutoConfig.from_pretrained(args.vision_tower)
        vision = getattr(vision, "vision_config", vision)
        strategy = "default" if ADDITIONAL_TOKENS.get(vision.model_type, 0) else "full"
        return AutoConfig.from_pretrained(args.language_model).num_hidden_layers, visual_tokens(vision, strategy)
    raise ValueError("give --model (a checkpoint or tiny:<family>) or --vision_tower and --language_model")


def build_curriculum(args: DistillArguments, num_layers: int, image_tokens: int) -> Curriculum:
    """The mode's schedules, every number checked (raises before any compute)."""
    check_stage(build_method(args.method, **args.options()), args.layer)
    if args.teacher_method is not None:
        if training_mode(args.mode).step != "consistency":
            raise ValueError(f"teacher_method is the TCD/LCD teacher's method; mode {args.mode!r} has no such teacher")
        check_stage(build_method(args.teacher_method, **args.options(args.teacher_method_options)), args.layer)
    check_later_stages(args, num_layers)
    if args.tokens is not None or args.ratio is not None:
        budget = Budget(tokens=args.tokens, ratio=args.ratio)
        target = 1.0 - budget.resolve(image_tokens) / image_tokens
    else:
        target = None
    if args.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {args.schedule!r}; choose one of {SCHEDULES}")
    if not 0.0 <= args.kd_alpha <= 1.0 or args.temperature <= 0:
        raise ValueError(f"alpha must lie in [0, 1] and temperature be > 0 (got {args.kd_alpha}, {args.temperature})")
    mode = training_mode(args.mode)
    tokens = None
    if mode.token_schedule:
        if target is None:
            raise ValueError(f"mode {args.mode!r} needs a target budget: set tokens or ratio")
        preset = released_token_schedule() if args.schedule == "released" else target_token_schedule(target)
        overrides = {
            name: getattr(args, name)
            for name in ("r_min_start", "r_min_end", "r_max_start", "r_max_end", "gap_start", "gap_slope", "gap_max")
            if getattr(args, name) is not None
        }
        tokens = TokenSchedule(**{**preset.__dict__, **overrides, "hold": args.schedule_hold})
    layers = None
    if mode.layer_schedule:
        layers = LayerSchedule(
            num_layers, args.layer, args.lcd_start_layer, args.lcd_gap_layers_max, hold=args.schedule_hold
        )
    return Curriculum(args.mode, num_layers, args.layer, target, tokens, layers)


def check_later_stages(args: DistillArguments, num_layers: int) -> None:
    """Later stages only where K is fixed, after K, at increasing layers of the model (raises before any compute)."""
    mode = training_mode(args.mode)
    if args.teacher_later_stages is not None and mode.step != "consistency":
        raise ValueError(f"teacher_later_stages is the TCD teacher's; mode {args.mode!r} has no such teacher")
    for teacher in (False, True):
        later = args.later_stage_pairs(teacher)
        if later and mode.layer_schedule:
            raise ValueError(f"later_stages follow a fixed layer K; mode {args.mode!r} moves K (LCD): drop them")
        if later:
            check_stages(staged(args.layer, 0.0, later), num_layers)


def check_kd_options(model_args: ModelArguments, args: DistillArguments, student_image_tokens: int) -> None:
    """The LLaVA-KD options, from configs alone (raises before any weight is loaded): a teacher exactly for the
    kd-* modes, its visual-token count equal to the student's, valid weights and dtype, something to train."""
    mode = training_mode(args.mode)
    if not mode.needs_teacher_model:
        if model_args.teacher:
            kd_modes = tuple(name for name, other in TRAINING_MODES.items() if other.needs_teacher_model)
            raise ValueError(f"--teacher is used by the LLaVA-KD modes {kd_modes} only, not by mode {args.mode!r}")
        return
    if not model_args.teacher or model_args.teacher.startswith("tiny:"):
        raise ValueError(f"mode {args.mode!r} distils from a teacher: give --teacher, a trained LLaVA checkpoint")
    args.loss_weights()
    teacher_dtype(model_args.teacher_dtype, torch.device("cpu"))
    if mode.projector_only and (args.freeze_projector or args.lora_r > 0):
        raise ValueError("kd-pretrain trains the projector only: it cannot be frozen, and LoRA on the LLM is unused")
    teacher_config = AutoConfig.from_pretrained(model_args.teacher)
    check_visual_tokens(
        student_image_tokens,
        visual_tokens(teacher_config.vision_config, teacher_config.vision_feature_select_strategy),
    )


def build_step(
    model_args: ModelArguments,
    args: DistillArguments,
    kind: StepKind,
    vocab_size: int,
    device: torch.device,
) -> TrainingStep:
    """The training step the mode runs; the kd step loads its teacher (`vocab_size`: the tokenizer's length)."""
    compressor = Compressor(args.method, args.options(), args.later_stage_pairs())
    if kind == "sft":
        return SftStep(compressor)
    if kind == "consistency":
        teacher = None
        if args.teacher_method is not None or args.teacher_later_stages is not None:
            method = args.method if args.teacher_method is None else args.teacher_method
            options = args.options() if args.teacher_method is None else args.options(args.teacher_method_options)
            teacher = Compressor(method, options, args.later_stage_pairs(teacher=True))
        return ConsistencyStep(compressor, args.kd_alpha, args.temperature, teacher)
    teacher = load_teacher(model_args.teacher, model_args.teacher_dtype, model_args.attn_implementation, device)
    return KDStep(teacher, args.loss_weights(), vocab_size, compressor)


def prepare_model(model, args: DistillArguments):
    """Freeze what the options and the stage say, then wrap the LLM with LoRA when asked.

    `kd-pretrain` (Distilled Pre-Training) trains the projector only; the other modes the projector and the LLM
    unless frozen by the options. Every part is set both ways, so one model can go through the stages in turn.
    """
    projector_only = training_mode(args.mode).projector_only
    language_model = not (args.freeze_language_model or projector_only)
    model.model.vision_tower.requires_grad_(not (args.freeze_vision_tower or projector_only))
    model.model.multi_modal_projector.requires_grad_(not args.freeze_projector)
    model.model.language_model.requires_grad_(language_model)
    model.lm_head.requires_grad_(language_model)
    if args.lora_r <= 0:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("LoRA needs peft: pip install 'epic-mllm[lora]'") from error
    targets = "|".join(module.strip() for module in args.lora_target_modules.split(","))
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=rf".*language_model.*\.({targets})",
        modules_to_save=None if args.freeze_projector else ["multi_modal_projector"],
    )
    return get_peft_model(model, config)


def _connect_processes(training_args: TrainingArguments) -> None:
    """Start the process group (and DeepSpeed's) before any model exists: ZeRO-3 partitions at construction."""
    device = training_args.device
    if training_args.deepspeed and training_args.world_size > 1:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")


def disconnect_processes() -> None:
    """Wait for every rank, then close the process group: a rank that exits while another is still writing the
    final checkpoint can abort in the group's background threads ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def build_trainer(
    model_args: ModelArguments,
    data_args: DataArguments,
    distill_args: DistillArguments,
    training_args: TrainingArguments,
) -> EpicTrainer:
    """Check every option, then build the model (and the teacher of the kd-* modes), the data and the trainer."""
    set_seed(training_args.seed)
    num_layers, image_tokens = model_shape(model_args)
    build_curriculum(distill_args, num_layers, image_tokens)  # every option checked before any compute
    check_kd_options(model_args, distill_args, image_tokens)
    if distill_args.lora_r > 0 and is_deepspeed_zero3_enabled():
        raise ValueError("LoRA under DeepSpeed ZeRO-3 is not supported (merging needs whole weights); use ZeRO-2")
    _connect_processes(training_args)
    training_args.remove_unused_columns = False  # rows are `Example`s, batched by our collator
    train_file = Path(data_args.train_file)
    if data_args.synthesize and not train_file.exists():
        write_synthetic(train_file.parent, SynthConfig(n_train=data_args.synth_train, seed=data_args.synth_seed))
    model, processor, template_name = build_model(model_args)
    curriculum = build_curriculum(
        distill_args, model.config.text_config.num_hidden_layers, image_token_count(processor)
    )
    mode = curriculum.training_mode
    if mode.needs_teacher_model:  # before the data is read and the teacher's weights are loaded
        teacher_config = AutoConfig.from_pretrained(model_args.teacher)
        check_teacher(model, processor, teacher_config, AutoProcessor.from_pretrained(model_args.teacher))
    template = get_template(template_name, processor.tokenizer)
    dataset = LlavaDataset(
        train_file,
        data_args.image_folder and Path(data_args.image_folder),
        processor,
        template,
        max_length=data_args.max_length,
        image_mode=data_args.image_mode,
        on_error=data_args.on_error,
        verify_images=data_args.verify_images,
    )
    step = build_step(model_args, distill_args, mode.step, len(processor.tokenizer), training_args.device)
    model = prepare_model(model, distill_args)
    pad_id = processor.tokenizer.pad_token_id
    return EpicTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=lambda examples: collate(examples, pad_id),
        processing_class=processor,
        curriculum=curriculum,
        step=step,
        compression_seed=distill_args.compression_seed,
        template=template_name,
        projector_lr=distill_args.projector_lr,
        group_by_modality_length=data_args.group_by_modality_length,
    )


def _kept(ratio: float, image_tokens: int) -> int:
    """Visual tokens kept at drop ratio `ratio` (at least one)."""
    return max(1, round((1.0 - ratio) * image_tokens))


def describe_compression(curriculum: Curriculum, method: str, image_tokens: int) -> str:
    """What the student sees over the run, in kept tokens and layers, e.g. for TCD at 7 of 64 tokens: 'dart from
    layer 2, target 7 of 64 visual tokens; the student keeps 58 at the start, 7 to 45 at the end'."""
    if curriculum.target_ratio is None:
        return f"no compression (all {image_tokens} visual tokens)"
    target = f"target {_kept(curriculum.target_ratio, image_tokens)} of {image_tokens} visual tokens"
    words = f"{method} from layer {curriculum.layer}, {target}"
    if curriculum.tokens is not None:
        start, end = curriculum.tokens.ratio_range(0.0), curriculum.tokens.ratio_range(1.0)
        first = sorted({_kept(ratio, image_tokens) for ratio in start})
        low, high = _kept(end[1], image_tokens), _kept(end[0], image_tokens)
        words += f"; the student keeps {' to '.join(map(str, first))} at the start, {low} to {high} at the end"
    if curriculum.layers is not None:
        words += f"; compression moves from layer {curriculum.layers.first_layer} to {curriculum.layers.final_layer}"
    return words


def _numel(parameter: torch.nn.Parameter) -> int:
    """A parameter's size, whole under ZeRO-3 too (where the local tensor is a partition)."""
    return getattr(parameter, "ds_numel", parameter.numel())


def start_banner(trainer: EpicTrainer, distill_args: DistillArguments, data_file: Path) -> str:
    """The line `epic train` prints before the first step: mode, rows, parameters, compression, steps, output."""
    parameters = list(trainer.model.parameters())
    trained = sum(_numel(p) for p in parameters if p.requires_grad)
    args = trainer.args
    steps = (
        f"{args.max_steps} step{'s' * (args.max_steps != 1)}"
        if args.max_steps > 0
        else f"{args.num_train_epochs:g} epoch(s)"
    )
    compression = describe_compression(
        trainer.curriculum, distill_args.method, image_token_count(trainer.processing_class)
    )
    return (
        f"epic train: {distill_args.mode} | {len(trainer.train_dataset)} rows of {data_file} | "
        f"{trained / 1e6:.2f}M of {sum(map(_numel, parameters)) / 1e6:.2f}M parameters trained | "
        f"{compression} | {steps} | into {args.output_dir}"
    )


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    distill_args: DistillArguments,
    training_args: TrainingArguments,
) -> Path:
    """Train as the options say; returns the folder of the final checkpoint (a plain transformers LLaVA)."""
    trainer = build_trainer(model_args, data_args, distill_args, training_args)
    if trainer.is_world_process_zero():
        print(start_banner(trainer, distill_args, Path(data_args.train_file)), flush=True)
    processor, template_name = trainer.processing_class, trainer.template
    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = last_complete_checkpoint(Path(training_args.output_dir))
        if resume is None and any(Path(training_args.output_dir).glob("checkpoint-*")):
            raise ValueError(f"{training_args.output_dir} holds checkpoints but none was saved completely")
        if resume is None:
            logger.warning("no checkpoint in %s: training starts from the beginning", training_args.output_dir)
        else:
            logger.warning("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    final = Path(training_args.output_dir) / "final"
    if distill_args.lora_r > 0:
        if trainer.args.should_save:
            save_llava(trainer.model.merge_and_unload(), processor, final, template_name)
    else:
        trainer.save_model(str(final))  # gathers ZeRO-3 partitions; writes the processor and epic.json too
    if trainer.args.should_save:
        (final / LOG_FILE).write_text(json.dumps(trainer.state.log_history, indent=1))  # the losses, for reports
    return final
