"""A tiny saved LLaVA and pictures to talk about, for the `epic chat` and `epic web` tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from epic.data.shapes import SynthConfig, draw_scene, random_scene, vocabulary_texts
from epic.models.factory import build_tiny_llava_with_processor, save_llava
from epic.models.tiny import TinyLlavaSpec

SPEC = TinyLlavaSpec()  # 64 visual tokens, 4 decoder layers


def save_tiny_chat(folder: Path):
    """Write `model/` (a tiny LLaVA, vicuna_v1), `scene.png` (a picture of the built-in synthetic set) and
    `notes.png` (a text file named like an image) under `folder`; return the model (eval mode) and processor."""
    model, processor = build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), SPEC)
    save_llava(model, processor, folder / "model", "vicuna_v1")
    config = SynthConfig()
    scene = draw_scene(random_scene(np.random.default_rng(3), config), config.image_size, config.grid)
    scene.save(folder / "scene.png")
    (folder / "notes.png").write_text("not an image at all\n")
    return model.eval(), processor
