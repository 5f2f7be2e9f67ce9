"""Assembling a LLaVA from a vision tower, an LLM and stage-1 projector weights, all tiny and local."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import epic
from epic.compat import image_features
from epic.models.assemble import assemble_llava, load_projector
from epic.models.factory import word_tokenizer
from tests.helpers import save_tiny_parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    saved = save_tiny_parts(tmp_path_factory.mktemp("parts"), ["What color is the shape ? red blue"])
    return saved["vision"].parent, saved["vision_model"], saved["llm_model"], saved["projector_weights"]


def test_assembled_model_holds_every_part(parts):
    root, vision, llm, projector = parts
    model, processor = assemble_llava(root / "vision", root / "llm", root / "projector.safetensors")
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, projector["model.mm_projector.0.weight"])
    assert torch.equal(model.model.multi_modal_projector.linear_2.bias, projector["model.mm_projector.2.bias"])
    for name, tensor in vision.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], tensor)
    text = torch.tensor([processor.tokenizer.encode("What color is the shape ?", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=text).logits, llm(input_ids=text).logits)
    assert model.config.image_seq_length == 64
    assert processor.image_token_id == model.config.image_token_id


def test_assembled_model_runs_compressed(parts):
    root, *_ = parts
    model, processor = assemble_llava(root / "vision", root / "llm", root / "projector.safetensors")
    from PIL import Image

    inputs = processor(
        images=Image.new("RGB", (60, 40), "blue"), text="<image> What color is the shape ?", return_tensors="pt"
    )
    with torch.no_grad(), epic.compress(model, "fastv", tokens=6) as state:
        model(**inputs)
    assert state.kept[0].numel() == 6


def test_bad_projector_keys_fail_loudly(tmp_path):
    save_file({"vision.proj.weight": torch.zeros(2, 2)}, str(tmp_path / "p.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected projector weight 'vision\.proj\.weight'"):
        load_projector(tmp_path / "p.safetensors")


def test_siglip_tower_keeps_every_patch(tmp_path):
    from PIL import Image
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from epic.data.dataset import image_token_count

    SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=48,
            patch_size=6,
        )
    ).save_pretrained(tmp_path / "siglip")
    from transformers import SiglipImageProcessorPil

    SiglipImageProcessorPil(size={"height": 48, "width": 48}).save_pretrained(tmp_path / "siglip")
    tokenizer = word_tokenizer(["What color is it ?"])
    tokenizer.save_pretrained(tmp_path / "llm")
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
        )
    ).save_pretrained(tmp_path / "llm")
    model, processor = assemble_llava(tmp_path / "siglip", tmp_path / "llm")
    assert model.config.vision_feature_select_strategy == "full"
    assert model.config.image_seq_length == image_token_count(processor) == 64
    inputs = processor(images=Image.new("RGB", (48, 48)), text="<image> What color is it ?", return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    assert image_features(out).shape[0] == 64
