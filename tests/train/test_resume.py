"""A run killed with SIGKILL and resumed ends with the weights of a run never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from epic.train.config import parse_recipe
from epic.train.run import run_training
from epic.train.trainer import last_complete_checkpoint
from tests.train.conftest import tiny_options

STEPS = 40


def options(shapes, output_dir):
    return tiny_options(
        shapes,
        output_dir,
        mode="tcd",
        method="random",
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=4,
        lr_scheduler_type="cosine",
        warmup_steps=2,
    )


def test_killed_run_resumes_exactly(shapes, tmp_path):
    reference = run_training(*parse_recipe(None, options(shapes, tmp_path / "reference")))

    interrupted = tmp_path / "interrupted"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "epic.cli", "train", *options(shapes, interrupted)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=environment,
    )
    deadline = time.time() + 120
    while last_complete_checkpoint(interrupted) is None:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "final").exists()
    resumed_from = last_complete_checkpoint(interrupted)
    assert int(resumed_from.name.split("-")[1]) < STEPS

    resumed = run_training(*parse_recipe(None, [*options(shapes, interrupted), "--resume_from_checkpoint", "last"]))
    expected, actual = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_unfinished_checkpoints_are_skipped(tmp_path):
    for step, complete in ((4, True), (8, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / ".complete").write_text("ok\n")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-8"
    assert last_complete_checkpoint(Path(tmp_path / "nothing")) is None
