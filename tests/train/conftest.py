"""A tiny synthetic set written once, and recipes pointing at it."""

from __future__ import annotations

import pytest

from epic.data.shapes import SynthConfig, write_synthetic


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-shapes")
    write_synthetic(folder, SynthConfig(n_train=96, n_val=8, n_test=8, n_captions=4, seed=5))
    return folder


def tiny_options(shapes, output_dir, **overrides) -> list[str]:
    """Command-line options for a tiny run on the synthetic set (overrides win)."""
    options = {
        "model": "tiny:llama",
        "tiny_layers": 4,
        "tiny_hidden_size": 64,
        "template": "vicuna_v1",
        "train_file": shapes / "train.json",
        "image_folder": shapes / "images",
        "max_length": 256,
        "mode": "tcd",
        "method": "dart",
        "tokens": 7,
        "output_dir": output_dir,
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        **overrides,
    }
    argv = []
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return argv
