"""Assemble a LLaVA from separate parts, as the paper starts stage 2: a vision tower, an LLM, a stage-1 projector.

Each part is loaded with its real transformers loader (a hub id or a local folder; safetensors). The projector file
is a safetensors file in either naming: LLaVA's own (`model.mm_projector.0.weight`, `...2.weight`) or
transformers' (`multi_modal_projector.linear_1.weight`, `...linear_2...`). The `<image>` token is added to the
tokenizer (and the embeddings resized) when the LLM's tokenizer lacks it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
)

PROJECTOR_KEYS = {
    r"^(model\.)?mm_projector\.0\.(weight|bias)$": "linear_1",
    r"^(model\.)?mm_projector\.2\.(weight|bias)$": "linear_2",
    r"^(model\.)?multi_modal_projector\.linear_1\.(weight|bias)$": "linear_1",
    r"^(model\.)?multi_modal_projector\.linear_2\.(weight|bias)$": "linear_2",
}
ADDITIONAL_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}  # CLS-like tokens the tower adds


def visual_tokens(vision_config, vision_feature_select_strategy: str) -> int:
    """Visual tokens per image of a CLIP- or SigLIP-like tower: patches, plus CLS, minus one for "default"."""
    additional = ADDITIONAL_TOKENS.get(vision_config.model_type, 0)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + additional - (1 if vision_feature_select_strategy == "default" and additional else 0)


def load_projector(path: Path) -> dict[str, torch.Tensor]:
    """A stage-1 projector's weights, renamed to `linear_1.*` / `linear_2.*`; unknown keys fail loudly."""
    renamed = {}
    for key, tensor in load_file(str(path)).items():
        for pattern, layer in PROJECTOR_KEYS.items():
            match = re.match(pattern, key)
            if match:
                renamed[f"{layer}.{match.group(2)}"] = tensor
                break
        else:
            raise ValueError(f"{path}: unexpected projector weight {key!r} (expected mm_projector.0/2 or linear_1/2)")
    return renamed


def _vision_tower(vision_path: str | Path, vision_config) -> PreTrainedModel:
    from transformers import AutoModel

    tower_class = type(AutoModel.from_config(vision_config))
    return tower_class.from_pretrained(vision_path, config=vision_config)


def assemble_llava(
    vision_path: str | Path,
    language_path: str | Path,
    projector_path: str | Path | None = None,
    *,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    projector_hidden_act: str = "gelu",
    image_token: str = "<image>",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A `LlavaForConditionalGeneration` and its processor from a vision tower, an LLM and optional projector weights.

    Without `projector_path` the projector keeps its random initialisation (stage-1 training starts there). A tower
    without a CLS token (SigLIP) uses the "full" feature strategy: "default" would drop a real patch.
    """
    vision_config = AutoConfig.from_pretrained(vision_path)
    vision_config = getattr(vision_config, "vision_config", vision_config)
    language = AutoModelForCausalLM.from_pretrained(language_path)
    tokenizer = AutoTokenizer.from_pretrained(language_path)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if len(tokenizer) > language.get_input_embeddings().num_embeddings:
        language.resize_token_embeddings(len(tokenizer))
    additional = ADDITIONAL_TOKENS.get(vision_config.model_type, 0)
    if additional == 0 and vision_feature_select_strategy == "default":
        vision_feature_select_strategy = "full"  # "default" drops token 0, a real patch when there is no CLS
    image_tokens = visual_tokens(vision_config, vision_feature_select_strategy)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=language.config,
        image_token_id=tokenizer.convert_tokens_to_ids(image_token),
        image_seq_length=image_tokens,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act=projector_hidden_act,
        tie_word_embeddings=language.config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = _vision_tower(vision_path, vision_config)
    model.model.language_model = language.model
    model.lm_head = language.lm_head
    if projector_path is not None:
        weights = load_projector(Path(projector_path))
        missing, unexpected = model.model.multi_modal_projector.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"{projector_path}: projector weights missing {missing}, unexpected {unexpected}")
    image_processor = AutoImageProcessor.from_pretrained(vision_path)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=additional,
        image_token=image_token,
    )
    return model.eval(), processor
