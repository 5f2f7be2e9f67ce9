"""Test-wide settings: offline, one thread, deterministic; transformers' deprecations as errors on request."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

pytest_plugins = ["tests.strict_deprecations"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
