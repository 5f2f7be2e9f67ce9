"""Two processes (torchrun, gloo on CPU) train exactly like one process accumulating two micro-batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epic.train.config import parse_recipe
from epic.train.run import run_training
from tests.train.conftest import tiny_options

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def train_on_two_processes(argv: list[str]) -> None:
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "epic.cli", "train", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_weights(expected_folder: Path, actual_folder: Path) -> None:
    expected = load_file(expected_folder / "model.safetensors")
    actual = load_file(actual_folder / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed beside this Python")
def test_two_process_ddp_matches_one_process(shapes, tmp_path):
    # SGD: an update linear in the gradient, so float-level differences of the all-reduce stay float-level
    common = {"mode": "tcd", "method": "fastv", "max_steps": 3, "learning_rate": 0.1, "optim": "sgd"}
    one = tiny_options(shapes, tmp_path / "one", per_device_train_batch_size=4, gradient_accumulation_steps=2, **common)
    single = run_training(*parse_recipe(None, one))

    two = tiny_options(shapes, tmp_path / "two", per_device_train_batch_size=4, ddp_backend="gloo", **common)
    train_on_two_processes(two)
    assert_same_weights(single, tmp_path / "two" / "final")


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process(shapes, tmp_path, stage):
    """ZeRO-2 and ZeRO-3 on two CPU processes; under ZeRO-3 the teacher pass gathers the same partitioned weights."""
    pytest.importorskip("deepspeed")
    common = {"mode": "tcd", "method": "dart", "max_steps": 3, "learning_rate": 0.1, "optim": "sgd"}
    one = tiny_options(shapes, tmp_path / "one", per_device_train_batch_size=4, gradient_accumulation_steps=2, **common)
    single = run_training(*parse_recipe(None, one))
    config = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed" / f"zero{stage}.json"
    two = tiny_options(shapes, tmp_path / "two", per_device_train_batch_size=4, deepspeed=config, **common)
    train_on_two_processes(two)
    assert_same_weights(single, tmp_path / "two" / "final")


def test_lora_under_zero3_is_refused_before_compute(shapes, tmp_path):
    pytest.importorskip("deepspeed")
    config = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed" / "zero3.json"
    argv = tiny_options(shapes, tmp_path, lora_r=4, deepspeed=config)
    result = subprocess.run(  # a separate process: a ZeRO-3 TrainingArguments changes how models are built
        [sys.executable, "-m", "epic.cli", "train", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0 and "LoRA under DeepSpeed ZeRO-3 is not supported" in result.stderr
