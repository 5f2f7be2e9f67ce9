"""Shapes of the tiny LLaVA models (`TinyLlavaSpec`) and the named presets of `epic bench`.

Torch-free, so that the command line lists the presets in `--help` without importing torch; the models are built
from these specs by `epic.models.tiny`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Shape of a LLaVA model: a CLIP vision tower, a 2-layer MLP projector and a decoder-only LLM.

    The number of visual tokens per image is `(image_size // patch_size) ** 2` (CLS dropped, LLaVA's
    "default" feature strategy).
    """

    text_model: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    image_size: int = 48
    patch_size: int = 6
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    position_code_scale: float = 0.0  # > 0: the tower's patch positions start as 2D sinusoids of this amplitude
    max_position_embeddings: int = 4096
    image_token_index: int | None = None  # default: the last id of the vocabulary
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_token_id(self) -> int:
        return self.vocab_size - 1 if self.image_token_index is None else self.image_token_index


PRESETS = {
    "tiny": TinyLlavaSpec(),
    # 196 visual tokens and a decoder wide enough for CPU timings to mean something
    "demo": TinyLlavaSpec(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1408,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        image_size=84,
        patch_size=6,
        vision_hidden_size=32,
        vision_layers=1,
        vision_heads=2,
    ),
    # a decoder wide enough that matrix products dominate, small enough for one CPU thread; 576 visual tokens
    "cpu-wide": TinyLlavaSpec(
        vocab_size=1024,
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=8,
        num_heads=16,
        num_kv_heads=16,
        image_size=336,
        patch_size=14,
        vision_hidden_size=32,
        vision_layers=1,
        vision_heads=2,
    ),
    # LLaVA-1.5-7B decoder shapes (Vicuna-7B) with a tiny vision tower at 336 px / 14: random weights, no download
    "llava-7b": TinyLlavaSpec(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        image_size=336,
        patch_size=14,
        vision_hidden_size=64,
        vision_layers=1,
        vision_heads=2,
    ),
}
