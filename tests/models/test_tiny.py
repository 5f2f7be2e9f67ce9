"""Tiny LLaVA models: built from configs, saved as safetensors, loaded back with the real loader."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import epic
from epic.compat import image_features
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.helpers import Row, make_batch


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_tiny_model_has_the_declared_shape(family):
    spec = TinyLlavaSpec(text_model=family)
    model = build_tiny_llava(spec)
    assert type(model.model.language_model).__name__.lower().startswith(family)
    batch = make_batch(spec, [Row()], labels=False)
    with torch.no_grad():
        out = model(**batch)
    assert image_features(out).shape == (spec.image_tokens, spec.hidden_size)


def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    first, second = build_tiny_llava(seed=3), build_tiny_llava(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(next(build_tiny_llava(seed=4).parameters()), next(first.parameters()))


def test_unknown_text_model():
    with pytest.raises(ValueError, match="unknown text model 'gpt9'"):
        build_tiny_llava(TinyLlavaSpec(text_model="gpt9"))


def test_local_folder_round_trip_with_safetensors(tmp_path):
    spec = TinyLlavaSpec()
    model = build_tiny_llava(spec)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True, use_safetensors=True)
    batch = make_batch(spec, [Row()], labels=False)
    with torch.no_grad(), epic.compress(loaded, "dart", tokens=4) as state:
        out = loaded(**batch)
        with epic.compress(model, "dart", tokens=4) as original_state:
            expected = model(**batch)
    assert torch.equal(state.kept[0], original_state.kept[0])
    torch.testing.assert_close(out.logits, expected.logits)


def test_position_codes_tell_patches_apart_and_leave_cls_at_zero():
    spec = TinyLlavaSpec(image_size=48, patch_size=6, vision_hidden_size=64, position_code_scale=0.3)
    table = build_tiny_llava(spec).model.vision_tower.embeddings.position_embedding.weight.detach()
    assert table.shape == (1 + spec.image_tokens, 64)
    assert table[0].abs().max() == 0  # the CLS position
    codes = table[1:]
    distances = torch.cdist(codes, codes) + torch.eye(spec.image_tokens) * 1e3
    assert distances.min() > 0.05  # every patch has its own code
    assert abs(codes.pow(2).mean().sqrt() - 0.3 / 2**0.5) < 0.02  # amplitude 0.3: comparable to patch contents
    random = build_tiny_llava(TinyLlavaSpec(image_size=48, patch_size=6, vision_hidden_size=64))
    assert random.model.vision_tower.embeddings.position_embedding.weight.std() < 0.05
