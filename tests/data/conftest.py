"""A small synthetic set and a tiny LLaVA with a fitted tokenizer, shared by the data tests."""

from __future__ import annotations

import pytest

from epic.data.shapes import SynthConfig, vocabulary_texts, write_synthetic
from epic.models.factory import build_tiny_llava_with_processor
from epic.models.tiny import TinyLlavaSpec

SYNTH = SynthConfig(n_train=300, n_val=30, n_test=150, n_captions=20, seed=7)
SPEC = TinyLlavaSpec(image_size=48, patch_size=6)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    write_synthetic(folder, SYNTH)
    return folder


@pytest.fixture(scope="session")
def tiny(shapes_dir):
    """(model, processor) whose vocabulary covers the synthetic set and the templates."""
    return build_tiny_llava_with_processor(vocabulary_texts(SYNTH), SPEC)
