"""epic.compat: the names read from the installed transformers, and loud failures when transformers moves them."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
import transformers.masking_utils as masking
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import DynamicCache, Trainer
from transformers.utils import ModelOutput

import epic
from epic import compat
from epic.compat import IncompatibleTransformers, Layout, cache_length, check_mask_fits_cache, image_features
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.helpers import Row, make_batch

SPEC = TinyLlavaSpec()
RENAMED = "kv_cache"  # what a future transformers might call the cache


@dataclasses.dataclass
class LogitsOnly(ModelOutput):
    logits: torch.Tensor | None = None


@pytest.fixture
def model():
    return build_tiny_llava(SPEC)


def _decoder_layer_class(model) -> type:
    return type(model.model.language_model.layers[0])


def _rename_cache(name: str):
    """A forward pre-hook that passes the cache on under `RENAMED` (as a transformers that renamed it would)."""

    def hook(module, args, kwargs):
        if kwargs.get(name) is None:
            return None
        kwargs = dict(kwargs)
        kwargs[RENAMED] = kwargs.pop(name)
        return args, kwargs

    return hook


def test_declared_range_is_the_one_compat_names_and_the_installed_version_is_in_it():
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    declared = next(req for req in pyproject["project"]["dependencies"] if req.startswith("transformers"))
    assert declared == f"transformers{compat.SUPPORTED}"
    assert Version(transformers.__version__) in SpecifierSet(compat.SUPPORTED)


def test_layout_resolves_the_name_the_installed_transformers_passes(model):
    expected = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    layout = Layout.of(model)
    assert (layout.model_cache, layout.layer_cache, layout.mask_cache, layout.output_cache) == (expected,) * 4
    assert layout.model_cache_aliases == (("past_key_values",) if expected == "cache" else ())
    seen = []
    hook = model.model.language_model.layers[3].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True
    )
    batch = make_batch(SPEC, [Row()], labels=False)
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    hook.remove()
    assert layout.layer_cache in seen[0]
    assert cache_length(layout.output_cache_of(out), 3) == batch["input_ids"].shape[1]


def test_a_decoder_layer_without_a_known_cache_keyword_fails_at_attach_naming_the_version(model, monkeypatch):
    layer_class = _decoder_layer_class(model)
    original = layer_class.forward

    def forward(self, hidden_states, attention_mask=None, position_ids=None, kv_cache=None, **kwargs):
        return original(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    monkeypatch.setattr(layer_class, "forward", forward)
    message = rf"{layer_class.__name__}.forward \(the decoder layer\) takes none of the cache keywords.*transformers "
    with pytest.raises(IncompatibleTransformers, match=message + re.escape(transformers.__version__)):
        epic.compress(model, "dart", tokens=4)
    assert not model.model.language_model.layers[2]._forward_pre_hooks  # nothing was left attached


def test_a_mask_function_that_renamed_its_parameters_fails_at_attach(model, monkeypatch):
    def create_causal_mask(config, inputs_embeds, attention_mask, kv_cache, position_ids=None, layer_idx=None):
        raise AssertionError("never called")

    monkeypatch.setattr(masking, "create_causal_mask", create_causal_mask)
    with pytest.raises(IncompatibleTransformers, match="create_causal_mask takes none of the cache keywords"):
        epic.compress(model, "dart", tokens=4)


@pytest.mark.parametrize("where", ["decoder layers", "model"])
def test_a_cache_passed_under_a_name_epic_did_not_resolve_is_an_error_not_a_silent_wrong_result(model, where):
    """Simulates a rename at run time: the cache reaches the hooks as `kv_cache`. Stock transformers would take it
    into `**kwargs` and run; epic must refuse rather than decode with a mask built for another cache."""
    layout = Layout.of(model)
    batch = make_batch(SPEC, [Row(), Row(before=9)], "left", labels=False)
    if where == "model":
        handles = [model.register_forward_pre_hook(_rename_cache(layout.model_cache), with_kwargs=True)]
    else:
        handles = [
            layer.register_forward_pre_hook(_rename_cache(layout.layer_cache), with_kwargs=True)
            for layer in model.model.language_model.layers
        ]
    refused = pytest.raises(IncompatibleTransformers, match=f"received its KV cache as `{RENAMED}`")
    with epic.compress(model, "dart", tokens=4), torch.no_grad(), refused:
        model(**batch, use_cache=True, **layout.with_cache(DynamicCache(config=model.config.text_config)))
    for handle in handles:
        handle.remove()


def test_decoding_a_compressed_cache_without_the_cache_reaching_a_layer_fails(model):
    layout = Layout.of(model)
    batch = make_batch(SPEC, [Row()], "left", labels=False)

    def drop_cache(module, args, kwargs):
        return args, {**kwargs, layout.layer_cache: None}

    with epic.compress(model, "fastv", tokens=4, layer=2), torch.no_grad():
        out = model(**batch, use_cache=True)
        hook = model.model.language_model.layers[3].register_forward_pre_hook(
            drop_cache, with_kwargs=True, prepend=True
        )
        step = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(step)], dim=1)
        with pytest.raises(RuntimeError, match="decoder layer 3 received no cache"):
            model(input_ids=step, attention_mask=mask, use_cache=True, **layout.with_cache(layout.output_cache_of(out)))
        hook.remove()


def test_a_mask_built_for_another_cache_length_is_refused_at_the_compressed_layer(model, monkeypatch):
    """If the engine ever misjudged a decoding step as a fresh forward, the stock mask (full length) would meet the
    shorter compressed cache: the always-on check must stop it. Simulated by hiding the cache's length."""
    layout = Layout.of(model)
    batch = make_batch(SPEC, [Row(), Row(before=9)], "left", labels=False)  # padded: sdpa gets a real mask
    with epic.compress(model, "fastv", tokens=4, layer=2), torch.no_grad():
        out = model(**batch, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(step)], dim=1)
        monkeypatch.setattr("epic.compression.engine.cache_length", lambda cache, layer_idx=0: 0)
        with pytest.raises(
            RuntimeError,
            match=r"decoder layer 2: the attention mask covers 81 keys but its KV cache holds 20 positions",
        ):
            model(input_ids=step, attention_mask=mask, use_cache=True, **layout.with_cache(layout.output_cache_of(out)))


def test_check_mask_fits_cache_compares_key_lengths_with_the_layer_it_is_for(model):
    layout = Layout.of(model)
    batch = make_batch(SPEC, [Row()], "left", labels=False)
    length = batch["input_ids"].shape[1]
    with epic.compress(model, "fastv", tokens=4, layer=2), torch.no_grad():
        cache = layout.output_cache_of(model(**batch, use_cache=True))
    kept = length - SPEC.image_tokens + 4
    check_mask_fits_cache(torch.zeros(1, 1, 1, length + 1), cache, 1, 1)  # layers below K hold everything
    check_mask_fits_cache(torch.zeros(1, kept + 1), cache, 1, 2)  # a 2D flash mask
    check_mask_fits_cache(None, cache, 1, 2)  # no mask (sdpa's causal shortcut) attends over the cache as it is
    with pytest.raises(RuntimeError, match=f"covers {length + 1} keys but its KV cache holds {kept} positions"):
        check_mask_fits_cache(torch.zeros(1, 1, 1, length + 1), cache, 1, 2)


def test_the_deprecated_cache_name_still_works_through_the_model_where_transformers_accepts_it(model):
    layout = Layout.of(model)
    if not layout.model_cache_aliases:
        pytest.skip(f"transformers {transformers.__version__} has no deprecated cache name")
    batch = make_batch(SPEC, [Row(), Row(before=9)], "left", labels=False)
    with epic.compress(model, "dart", tokens=5), torch.no_grad():
        steps = []
        for name in (layout.model_cache, *layout.model_cache_aliases):
            out = model(**batch, use_cache=True)
            step = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(step)], dim=1)
            deprecated = name != layout.model_cache
            with pytest.warns(FutureWarning, match="deprecated") if deprecated else contextlib.nullcontext():
                steps.append(model(input_ids=step, attention_mask=mask, **{name: layout.output_cache_of(out)}).logits)
    torch.testing.assert_close(steps[0], steps[1], atol=0, rtol=0)


def test_output_cache_of_reads_the_resolved_field_and_refuses_an_output_without_it(model):
    layout = Layout.of(model)
    assert layout.output_cache_of((torch.zeros(1),)) is None  # return_dict=False: no cache to read

    with pytest.raises(IncompatibleTransformers, match=f"LogitsOnly has no field `{layout.output_cache}`"):
        layout.output_cache_of(LogitsOnly(logits=torch.zeros(1)))


def test_image_features_are_every_images_projected_tokens_concatenated(model):
    batch = make_batch(SPEC, [Row(images=2), Row()], labels=False)
    with torch.no_grad():
        out = model(**batch)
    features = image_features(out)
    assert features.shape == (3 * SPEC.image_tokens, SPEC.hidden_size)
    with torch.no_grad():
        expected = model.model.multi_modal_projector(
            model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        )
    torch.testing.assert_close(features, expected.reshape(-1, SPEC.hidden_size), atol=1e-6, rtol=0)


def test_whole_parameters_unsets_the_deepspeed_config_and_restores_it(monkeypatch):
    from transformers.integrations import deepspeed as hf_deepspeed

    sentinel = object()
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", sentinel)
    with compat.whole_parameters():
        assert hf_deepspeed._hf_deepspeed_config_weak_ref is None
    assert hf_deepspeed._hf_deepspeed_config_weak_ref is sentinel


def test_trainer_overrides_are_checked_against_the_installed_trainer():
    compat.check_trainer_overrides(Trainer)
    for name, parameters in compat.TRAINER_OVERRIDES.items():
        assert all(p in inspect.signature(getattr(Trainer, name)).parameters for p in parameters)

    class Renamed(Trainer):
        _save_checkpoint = None

    with pytest.raises(IncompatibleTransformers, match="Trainer has no method `_save_checkpoint`"):
        compat.check_trainer_overrides(Renamed)

    class Reshaped(Trainer):
        def _save(self, directory=None, weights=None): ...

    with pytest.raises(IncompatibleTransformers, match=r"Trainer._save has no parameter\(s\) \['output_dir'"):
        compat.check_trainer_overrides(Reshaped)
