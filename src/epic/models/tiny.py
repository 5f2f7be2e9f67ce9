"""Tiny LLaVA models built from configs with random weights.

Tests, benchmarks and the demo use them: nothing is downloaded, and any text family that transformers'
`LlavaForConditionalGeneration` accepts can be built at any size (including LLaVA-1.5-7B shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
)

from epic.compat import set_attention_implementation

TEXT_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


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


def tiny_llava_config(spec: TinyLlavaSpec, attn_implementation: str = "sdpa") -> LlavaConfig:
    """A `LlavaConfig` for `spec` (by default the image token is the last id of the vocabulary, padding is 0)."""
    if spec.text_model not in TEXT_CONFIGS:
        raise ValueError(f"unknown text model {spec.text_model!r}; choose one of {sorted(TEXT_CONFIGS)}")
    text_config = TEXT_CONFIGS[spec.text_model](
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=spec.pad_token_id,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_hidden_size * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=spec.image_token_id,
        image_seq_length=spec.image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    set_attention_implementation(config, attn_implementation)
    return config


def init_position_codes(model: LlavaForConditionalGeneration, scale: float) -> None:
    """Start the CLIP tower's patch position embeddings as 2D sinusoids (row and column, several frequencies) of
    amplitude `scale`, the CLS position at zero.

    A randomly initialised CLIP gives positions a tenth of the patch contents' magnitude, so a model trained from
    scratch takes thousands of steps to tell where a patch is; with clear codes, questions about places are learnt
    early. They stay trainable.
    """
    embeddings = model.model.vision_tower.embeddings
    table = embeddings.position_embedding.weight  # [1 + side * side, hidden]
    side = embeddings.image_size // embeddings.patch_size
    frequencies = torch.arange(1, table.shape[1] // 4 + 1, dtype=torch.float32) * math.pi / side  # [hidden / 4]
    rows, columns = torch.arange(side * side).div(side, rounding_mode="floor"), torch.arange(side * side) % side
    angles_row, angles_column = rows[:, None] * frequencies, columns[:, None] * frequencies  # [patches, hidden / 4]
    codes = torch.stack([angles_row.sin(), angles_row.cos(), angles_column.sin(), angles_column.cos()], dim=-1)
    with torch.no_grad():
        table.zero_()
        table[1:, : codes[0].numel()] = scale * codes.flatten(1).to(table.dtype)


def build_tiny_llava(
    spec: TinyLlavaSpec | None = None,
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> LlavaForConditionalGeneration:
    """Build a LLaVA model with random weights drawn from `seed` (the global RNG is left untouched)."""
    spec = spec or TinyLlavaSpec()
    config = tiny_llava_config(spec, attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    if spec.position_code_scale > 0:
        init_position_codes(model, spec.position_code_scale)
    return model.to(dtype).eval()
