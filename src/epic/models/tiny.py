"""Tiny LLaVA models built from configs with random weights.

Tests, benchmarks and the demo use them: nothing is downloaded, and any text family that transformers'
`LlavaForConditionalGeneration` accepts can be built at any size (including LLaVA-1.5-7B shapes).
"""

from __future__ import annotations

import math

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
from epic.models.presets import TinyLlavaSpec

TEXT_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


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


QWEN_VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def build_tiny_qwen_vl(
    family: str = "qwen2_vl",
    spec: TinyLlavaSpec | None = None,
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """A Qwen2-VL or Qwen2.5-VL model with random weights drawn from `seed`: `spec`'s decoder (M-RoPE over its head
    dimension), a two-block vision tower of patch `spec.patch_size` merging 2 x 2 patches into one token, so an
    image of H x W pixels has (H / patch / 2) * (W / patch / 2) visual tokens (dynamic resolution)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if family not in QWEN_VL_FAMILIES:
        raise ValueError(f"unknown Qwen-VL family {family!r}; choose one of {QWEN_VL_FAMILIES}")
    spec = spec or TinyLlavaSpec()
    head_dim = spec.hidden_size // spec.num_heads
    rotary = head_dim // 2  # M-RoPE splits the rotary frequencies into (t, h, w) sections
    section = [rotary - 2 * (rotary // 3), rotary // 3, rotary // 3]
    vision = {
        "depth": 2,
        "hidden_size": spec.vision_hidden_size,
        "num_heads": spec.vision_heads,
        "patch_size": spec.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    if family == "qwen2_vl":
        vision.update(embed_dim=spec.vision_hidden_size, hidden_size=spec.hidden_size, mlp_ratio=2)
    else:
        vision.update(out_hidden_size=spec.hidden_size, intermediate_size=2 * spec.vision_hidden_size)
        vision.update(window_size=4 * spec.patch_size, fullatt_block_indexes=[1])
    config = AutoConfig.for_model(
        family,
        text_config={
            "vocab_size": spec.vocab_size,
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads,
            "max_position_embeddings": spec.max_position_embeddings,
            "rope_scaling": {"type": "mrope", "mrope_section": section},
            "pad_token_id": spec.pad_token_id,
            "bos_token_id": spec.bos_token_id,
            "eos_token_id": spec.eos_token_id,
            "tie_word_embeddings": False,
        },
        vision_config=vision,
        image_token_id=spec.image_token_id,
        video_token_id=spec.image_token_id - 1,
        vision_start_token_id=spec.image_token_id - 2,
        vision_end_token_id=spec.image_token_id - 3,
        tie_word_embeddings=False,
    )
    set_attention_implementation(config, attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    return model.to(dtype).eval()
