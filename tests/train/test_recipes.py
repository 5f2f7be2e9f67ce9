"""Every shipped recipe parses; the tiny ones also pass every check that runs before compute."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import yaml

from epic.train.config import parse_recipe, read_recipe
from epic.train.run import build_curriculum

GPU_RECIPES = ("llava15-7b", "llava-kd-")
RECIPES = sorted(Path(__file__).resolve().parents[2].glob("recipes/*.yaml"))


def test_recipes_exist():
    names = {path.name for path in RECIPES}
    assert {"llava15-7b-tcd-dart.yaml", "llava15-7b-lcd-dart.yaml", "tiny-sft.yaml", "tiny-tcd-dart.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_parses(recipe, tmp_path):
    options = read_recipe(recipe)
    if "deepspeed" in options:
        assert Path(options["deepspeed"]).is_file()
        if importlib.util.find_spec("deepspeed") is None:  # TrainingArguments loads DeepSpeed to read its config
            options.pop("deepspeed")
            recipe = tmp_path / recipe.name
            recipe.write_text(yaml.safe_dump(options))
    # the GPU recipes ask for bf16, which TrainingArguments checks against this (CPU) machine
    overrides = ["--use_cpu", "true"] if recipe.name.startswith(GPU_RECIPES) else []
    model_args, _, distill_args, training_args = parse_recipe(recipe, overrides)
    if recipe.name.startswith("llava15-7b"):
        assert training_args.learning_rate == 2e-5 and distill_args.tokens == 64 and training_args.bf16
        assert training_args.per_device_train_batch_size * 8 == 128
        build_curriculum(distill_args, num_layers=32, image_tokens=576)
    elif recipe.name.startswith("llava-kd-"):  # SPEC section 3: DPT (or PT) lr 1e-3, batch 256; else 2e-5, 128
        pretraining = distill_args.mode == "kd-pretrain" or distill_args.freeze_language_model
        assert training_args.learning_rate == (1e-3 if pretraining else 2e-5) and training_args.bf16
        assert training_args.per_device_train_batch_size * 8 == (256 if pretraining else 128)
        assert training_args.num_train_epochs == 1 and training_args.warmup_steps == 0.03
        assert distill_args.freeze_vision_tower and bool(model_args.teacher) == distill_args.mode.startswith("kd-")
        distill_args.loss_weights()
        build_curriculum(distill_args, num_layers=24, image_tokens=729)
    else:
        assert model_args.model.startswith(("tiny:", "epic-out/")) and training_args.use_cpu
        build_curriculum(distill_args, num_layers=model_args.tiny_layers, image_tokens=64)


@pytest.mark.parametrize(
    "chain",
    [
        ["llava-kd-4b-teacher-pt", "llava-kd-4b-teacher-sft"],
        ["llava-kd-1b-dpt", "llava-kd-1b-sft", "llava-kd-1b-dft"],
        ["tiny-kd-dpt", "tiny-kd-sft", "tiny-kd-dft"],
        ["tiny-kd-sft", "tiny-kd-tcd"],
    ],
)
def test_kd_stages_start_from_the_previous_stage(chain):
    recipes = [read_recipe(RECIPES[0].parent / f"{name}.yaml") for name in chain]
    for previous, stage in itertools.pairwise(recipes):
        assert stage["model"] == f"{previous['output_dir']}/final"


@pytest.mark.parametrize(
    ("prefix", "teacher"), [("llava-kd-1b", "llava-kd-4b-teacher-sft"), ("tiny-kd", "tiny-kd-teacher")]
)
def test_kd_recipes_name_the_final_checkpoint_of_their_teacher_recipe(prefix, teacher):
    folder = RECIPES[0].parent
    expected = f"{read_recipe(folder / f'{teacher}.yaml')['output_dir']}/final"
    named = [read_recipe(path).get("teacher") for path in RECIPES if path.name.startswith(prefix)]
    assert expected in named and set(named) <= {expected, None}
