"""Training options: YAML recipes plus `--key value` overrides, parsed by `HfArgumentParser` into dataclasses.

A recipe is a flat YAML mapping of option names (ours below, and any of transformers' `TrainingArguments`). A
recipe may `include:` other YAML files (paths relative to it), e.g. a DeepSpeed part; the including file wins. A
`deepspeed:` path that names a file beside its YAML file is resolved there.
Keys and `--key` overrides are matched exactly (argparse's prefix matching is off: `max_step` is an error, not
`max_steps`); epic's options, with their defaults and help, are listed by `epic train --options`.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser, TrainingArguments

from epic.compression.stages import parse_later_stages
from epic.distill.modes import MODES
from epic.train.kd import KD_WEIGHT_PRESETS, KDWeights, kd_weights

SCHEDULES = ("target", "released")
OPTIONS_HINT = "`epic train --options` lists epic's options; every transformers TrainingArguments field is one too"


@dataclass
class ModelArguments:
    _argument_group_name = "model"  # a section of `epic train --options`

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
    _argument_group_name = "data"

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
    _argument_group_name = "compression and distillation"

    mode: str = field(default="sft", metadata={"help": f"one of {MODES}"})
    method: str = field(default="dart", metadata={"help": "a registered compression method"})
    method_options: str = field(default="{}", metadata={"help": "the method's options as JSON"})
    teacher_method: str | None = field(
        default=None, metadata={"help": "TCD's teacher compresses with this method (default: the student's method)"}
    )
    teacher_method_options: str = field(default="{}", metadata={"help": "the teacher method's options as JSON"})
    later_stages: str = field(
        default="",
        metadata={
            "help": "later pruning stages after layer K, e.g. 15:0.5 (at layer 15 drop half of what K kept); they "
            "follow the schedule's ratio at K (TCD and SFT; not LCD, whose K moves)"
        },
    )
    teacher_later_stages: str | None = field(
        default=None, metadata={"help": "the TCD teacher's later stages (default: the student's; '' for none)"}
    )
    layer: int = field(
        default=2, metadata={"help": "K: the compression layer (0: before the LLM; the end layer of LCD)"}
    )
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
    lcd_start_layer: int | None = field(default=None, metadata={"help": "LCD's first student layer (default: L-1)"})
    lcd_gap_layers_max: int = field(default=2, metadata={"help": "LCD: the teacher's largest layer lead"})
    alpha: float | None = field(
        default=None, metadata={"help": "KD weight: L = alpha*T^2*KL + (1-alpha)*CE (default: 0.5; 0.4 for random)"}
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

    def options(self, text: str | None = None) -> dict[str, Any]:
        """The student method's options (or those JSON-encoded in `text`) as a dict."""
        text = self.method_options if text is None else text
        try:
            options = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"method options are not JSON: {text!r} ({error})") from error
        if not isinstance(options, dict):
            raise ValueError(f"method options must be a JSON object, got {text!r}")
        return options

    def later_stage_pairs(self, teacher: bool = False) -> tuple[tuple[int, float], ...]:
        """The student's (or the TCD teacher's) later pruning stages as (layer, dropped fraction) pairs."""
        text = self.teacher_later_stages if teacher and self.teacher_later_stages is not None else self.later_stages
        return tuple(parse_later_stages(text))

    def loss_weights(self) -> KDWeights:
        """LLaVA-KD's a, b, c: the preset with any weight overridden."""
        return kd_weights(self.kd_weights, self.res_weight, self.vis_weight, self.rel_weight)

    @property
    def kd_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return 0.4 if self.method == "random" else 0.5


ARGUMENT_CLASSES = (ModelArguments, DataArguments, DistillArguments, TrainingArguments)


class OptionParser(HfArgumentParser):
    """`HfArgumentParser` with exact option names (no prefix matching) whose errors are `ValueError`s, not exits."""

    def __init__(self, dataclass_types=ARGUMENT_CLASSES, **kwargs: Any) -> None:
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{message}; {OPTIONS_HINT}")


def option_names() -> set[str]:
    """Every recipe key: the fields of `ARGUMENT_CLASSES` that `HfArgumentParser` turns into options."""
    return {option.name for cls in ARGUMENT_CLASSES for option in fields(cls) if option.init}


def unknown_options(names: list[str], known: set[str], prefix: str = "") -> str:
    """The error for options not in `known`: each name, a close known one where there is one, and the hint."""
    guesses = [difflib.get_close_matches(name.lstrip("-").replace("-", "_"), known, n=1) for name in names]
    meant = [f"{prefix}{match[0]}" for match in guesses if match]
    suggestion = f" (did you mean {', '.join(meant)}?)" if meant else ""
    return f"unknown option(s) {names}{suggestion}; {OPTIONS_HINT}"


def read_recipe(path: Path) -> dict[str, Any]:
    """A YAML recipe with its `include:` files merged in (the including file wins); `yaml.safe_load` only.

    Every key must be an option name exactly (`include` aside): a misspelt one is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path}: no such file (give a YAML recipe, e.g. recipes/tiny-sft.yaml)")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of option names to values")
    includes = recipe.pop("include", [])
    known = option_names()
    unknown = sorted(str(key) for key in recipe if key not in known)
    if unknown:
        raise ValueError(f"{path}: {unknown_options(unknown, known)}")
    deepspeed = recipe.get("deepspeed")
    if isinstance(deepspeed, str) and (path.parent / deepspeed).is_file():
        recipe["deepspeed"] = str((path.parent / deepspeed).resolve())  # a config beside the recipe part
    merged: dict[str, Any] = {}
    for include in [includes] if isinstance(includes, str) else includes:
        if not (path.parent / include).is_file():
            raise FileNotFoundError(
                f"{path}: include {include!r} names no file (give a path relative to {path.parent})"
            )
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
    """Parse a recipe and `--key value` overrides (overrides win); keys are matched exactly, and an unknown one or a
    bad value is a `ValueError` naming it, a missing recipe a `FileNotFoundError`."""
    parser = OptionParser()
    options = read_recipe(recipe) if recipe is not None else {}
    for key in ("method_options", "teacher_method_options"):
        if isinstance(options.get(key), dict):
            options[key] = json.dumps(options[key])
    argv = _as_argv(options) + list(overrides or [])
    model_args, data_args, distill_args, training_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    names = [item.split("=", 1)[0] for item in unknown if item.startswith("-")]
    if names:
        raise ValueError(unknown_options(names, option_names(), prefix="--"))
    if unknown:
        raise ValueError(f"unexpected argument(s) {unknown}: give the recipe first, then --key value pairs")
    return model_args, data_args, distill_args, training_args
