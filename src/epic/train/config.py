"""Training options: YAML recipes plus `--key value` overrides, parsed by `HfArgumentParser` into dataclasses.

A recipe is a flat YAML mapping of option names (ours below, and any of transformers' `TrainingArguments`). A
recipe may `include:` other YAML files (paths relative to it), e.g. a DeepSpeed part; the including file wins. A
`deepspeed:` path that names a file beside its YAML file is resolved there.
Every option, with its default and help, is listed by `epic train --help`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from epic.distill.curriculum import MODES
from epic.train.kd import KD_WEIGHT_PRESETS, KDWeights, kd_weights

SCHEDULES = ("target", "released")


@dataclass
class ModelArguments:
    model: str | None = field(
        default=None,
        metadata={
            "help": "a LLaVA checkpoint (hub id or folder), or tiny:llama / tiny:qwen2 for a tiny model "
            "built for the synthetic data"
        },
    )
    vision_tower: str | None = field(default=None, metadata={"help": "parts: a vision tower checkpoint"})
    language_model: str | None = field(default=None, metadata={"help": "parts: a causal LM checkpoint"})
    projector: str | None = field(default=None, metadata={"help": "parts: stage-1 projector weights (safetensors)"})
    template: str | None = field(
        default=None, metadata={"help": "conversation template (default: the checkpoint's epic.json)"}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa or flash_attention_2"})
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "kd-* modes: the teacher, a LLaVA checkpoint (hub id or folder) with the student's tokenizer"
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "the teacher's dtype: auto (bf16 on a GPU that has it, else fp32), bfloat16, float16 or float32"
        },
    )
    tiny_layers: int = field(default=4, metadata={"help": "tiny models: decoder layers"})
    tiny_hidden_size: int = field(default=128, metadata={"help": "tiny models: hidden size"})
    tiny_image_size: int = field(default=48, metadata={"help": "tiny models: image side (pixels)"})
    tiny_patch_size: int = field(default=6, metadata={"help": "tiny models: patch side (pixels)"})


@dataclass
class DataArguments:
    train_file: str = field(default="", metadata={"help": "LLaVA-format JSON/JSONL"})
    image_folder: str | None = field(default=None, metadata={"help": "folder the image paths are relative to"})
    image_mode: str = field(default="pad", metadata={"help": "pad (LLaVA-1.5) or resize"})
    max_length: int = field(default=2048, metadata={"help": "rows longer than this are cut (never inside an image)"})
    on_error: str = field(default="strict", metadata={"help": "strict: bad rows stop the run; skip: counted, logged"})
    verify_images: bool = field(default=True, metadata={"help": "open every image once before training"})
    group_by_modality_length: bool = field(default=True, metadata={"help": "LLaVA's modality/length sampler"})
    synthesize: bool = field(
        default=False, metadata={"help": "draw the built-in shapes set into the train_file's folder if missing"}
    )
    synth_train: int = field(default=6000, metadata={"help": "with synthesize: training questions"})
    synth_seed: int = field(default=0, metadata={"help": "with synthesize: seed"})


@dataclass
class DistillArguments:
    mode: str = field(default="sft", metadata={"help": f"one of {MODES}"})
    method: str = field(default="dart", metadata={"help": "a registered compression method"})
    method_options: str = field(default="{}", metadata={"help": "the method's options as JSON"})
    layer: int = field(default=2, metadata={"help": "K: the compression layer (the end layer of LCD)"})
    tokens: int | None = field(
        default=None, metadata={"help": "target kept visual tokens per image (sft: fixed compression)"}
    )
    ratio: float | None = field(default=None, metadata={"help": "target drop ratio, instead of tokens"})
    schedule: str = field(default="target", metadata={"help": f"TCD ratio schedule preset: one of {SCHEDULES}"})
    r_min_start: float | None = field(default=None, metadata={"help": "override the preset's R_min at p=0"})
    r_min_end: float | None = field(default=None, metadata={"help": "override the preset's R_min at p=1"})
    r_max_start: float | None = field(default=None, metadata={"help": "override the preset's R_max at p=0"})
    r_max_end: float | None = field(default=None, metadata={"help": "override the preset's R_max at p=1"})
    gap_start: float | None = field(default=None, metadata={"help": "override d_0"})
    gap_slope: float | None = field(default=None, metadata={"help": "override d_slope"})
    gap_max: float | None = field(default=None, metadata={"help": "override d_max"})
    schedule_hold: float = field(
        default=0.0,
        metadata={
            "help": "the last fraction of training held at the schedules' end (TCD's ratios and gap, LCD's layer); "
            "0 as released: the ramps end with the run"
        },
    )
    lcd_start_layer: int | None = field(default=None, metadata={"help": "LCD's first student layer (default L-1)"})
    lcd_gap_layers_max: int = field(default=2, metadata={"help": "LCD: the teacher's largest layer lead"})
    alpha: float | None = field(
        default=None, metadata={"help": "KD weight: L = alpha*T^2*KL + (1-alpha)*CE (default 0.5; 0.4 for random)"}
    )
    temperature: float = field(default=1.0, metadata={"help": "KD temperature T"})
    kd_weights: str = field(
        default="released",
        metadata={
            "help": f"LLaVA-KD weights a, b, c of L = CE + a*res + b*vis + c*rel: one of {KD_WEIGHT_PRESETS} "
            "(1, 1, 1 as the released code; 1, 1, 0.5 as the paper suggests)"
        },
    )
    res_weight: float | None = field(default=None, metadata={"help": "override a (MDist, response part)"})
    vis_weight: float | None = field(default=None, metadata={"help": "override b (MDist, visual part)"})
    rel_weight: float | None = field(default=None, metadata={"help": "override c (RDist)"})
    compression_seed: int = field(default=0, metadata={"help": "seeds the schedule's draws and random selection"})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "keep the vision tower frozen"})
    freeze_projector: bool = field(default=False, metadata={"help": "keep the projector frozen"})
    freeze_language_model: bool = field(
        default=False, metadata={"help": "keep the LLM frozen (kd-pretrain always does: it trains the projector only)"}
    )
    projector_lr: float | None = field(default=None, metadata={"help": "projector learning rate (default: lr)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the LLM (0: full fine-tuning); needs peft"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata={"help": "comma-separated"}
    )

    def options(self) -> dict[str, Any]:
        try:
            options = json.loads(self.method_options)
        except json.JSONDecodeError as error:
            raise ValueError(f"method_options is not JSON: {self.method_options!r} ({error})") from error
        if not isinstance(options, dict):
            raise ValueError(f"method_options must be a JSON object, got {self.method_options!r}")
        return options

    def loss_weights(self) -> KDWeights:
        """LLaVA-KD's a, b, c: the preset with any weight overridden."""
        return kd_weights(self.kd_weights, self.res_weight, self.vis_weight, self.rel_weight)

    @property
    def kd_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return 0.4 if self.method == "random" else 0.5


ARGUMENT_CLASSES = (ModelArguments, DataArguments, DistillArguments, TrainingArguments)


def read_recipe(path: Path) -> dict[str, Any]:
    """A YAML recipe with its `include:` files merged in (the including file wins); `yaml.safe_load` only."""
    path = Path(path)
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of option names to values")
    deepspeed = recipe.get("deepspeed")
    if isinstance(deepspeed, str) and (path.parent / deepspeed).is_file():
        recipe["deepspeed"] = str((path.parent / deepspeed).resolve())  # a config beside the recipe part
    merged: dict[str, Any] = {}
    includes = recipe.pop("include", [])
    for include in [includes] if isinstance(includes, str) else includes:
        merged.update(read_recipe(path.parent / include))
    merged.update(recipe)
    return merged


def _as_argv(options: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, list):  # e.g. report_to: [tensorboard, wandb]
            argv += [f"--{key}", *(str(item) for item in value)]
            continue
        argv += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


def parse_recipe(
    recipe: Path | None, overrides: list[str] | None = None
) -> tuple[ModelArguments, DataArguments, DistillArguments, TrainingArguments]:
    """Parse a recipe and `--key value` overrides (overrides win); unknown keys are an error naming them."""
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    options = read_recipe(recipe) if recipe is not None else {}
    if isinstance(options.get("method_options"), dict):
        options["method_options"] = json.dumps(options["method_options"])
    argv = _as_argv(options) + list(overrides or [])
    model_args, data_args, distill_args, training_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; see `epic train --help`")
    return model_args, data_args, distill_args, training_args
