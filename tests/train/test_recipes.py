"""Every shipped recipe parses; the tiny ones also pass every check that runs before compute."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from epic.train.config import parse_recipe, read_recipe
from epic.train.run import build_curriculum

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
    overrides = ["--use_cpu", "true"] if recipe.name.startswith("llava15-7b") else []
    model_args, _, distill_args, training_args = parse_recipe(recipe, overrides)
    if recipe.name.startswith("llava15-7b"):
        assert training_args.learning_rate == 2e-5 and distill_args.tokens == 64 and training_args.bf16
        assert training_args.per_device_train_batch_size * 8 == 128
        build_curriculum(distill_args, num_layers=32, image_tokens=576)
    else:
        assert model_args.model.startswith("tiny:") and training_args.use_cpu
        build_curriculum(distill_args, num_layers=model_args.tiny_layers, image_tokens=64)
