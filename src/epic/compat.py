"""Every place where epic touches transformers internals, in one file.

transformers renames things between minor releases: 5.24 renamed the cache argument `past_key_values` to `cache` in
attention, decoder layers, models, `generate` and the mask functions, and kept the old name only through a shim
*inside* `forward`, which forward pre-hooks run before. A hook that looks for the old name then finds nothing, and the
model runs uncompressed or wrong without an error. So the names are read here from the installed signatures, once,
when compression is attached (`Layout.of(model)`); a layout this file does not know is an `IncompatibleTransformers`
error naming the installed version, and a cache met at run time under a name we did not resolve is one too.

`SUPPORTED` is the range CI tests (its oldest and newest ends); docs/compatibility.md says how to move it.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AttentionInterface, Cache, PreTrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

TRANSFORMERS_VERSION = transformers.__version__
SUPPORTED = ">=5.23,<5.25"  # keep equal to pyproject.toml's transformers range (tests/test_compat.py checks)
CACHE_NAMES = ("cache", "past_key_values")  # the KV cache keyword, newest first (5.24 renamed the second)
MASK_PARAMETERS = ("config", "inputs_embeds", "attention_mask", "position_ids", "and_mask_function", "layer_idx")
TRAINER_OVERRIDES = {  # the Trainer's private methods that epic's trainer overrides, with the parameters it passes
    "_get_train_sampler": ("train_dataset",),
    "_save": ("output_dir", "state_dict"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_save_checkpoint": ("model", "trial"),
    "_get_output_dir": ("trial",),
}


class IncompatibleTransformers(RuntimeError):
    """The installed transformers lays something out in a way epic does not know; the message names it."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} (transformers {TRANSFORMERS_VERSION}; epic is tested with transformers{SUPPORTED}: install a "
            "version in that range, or see docs/compatibility.md to support this one)"
        )


def _parameters(function: Callable) -> list[str]:
    return list(inspect.signature(function).parameters)


def _cache_keyword(function: Callable, what: str) -> str:
    """The one name of `CACHE_NAMES` in `function`'s signature (decorators that wrap it are seen through)."""
    found = [name for name in CACHE_NAMES if name in _parameters(function)]
    if len(found) != 1:
        raise IncompatibleTransformers(
            f"{what} takes {'both' if found else 'none'} of the cache keywords {list(CACHE_NAMES)}: parameters "
            f"{_parameters(function)}"
        )
    return found[0]


def _output_cache_field(forward: Callable, default: str) -> str:
    """The cache field of the output dataclass(es) named by `forward`'s return annotation (`tuple | XOutput`)."""
    try:
        annotation = typing.get_type_hints(forward).get("return")
    except Exception:  # an annotation that cannot be evaluated tells nothing: use the input's name
        return default
    candidates = [cls for cls in (*typing.get_args(annotation), annotation) if isinstance(cls, type)]
    for cls in candidates:
        if issubclass(cls, ModelOutput) and dataclasses.is_dataclass(cls):
            fields = [field.name for field in dataclasses.fields(cls)]
            found = [name for name in CACHE_NAMES if name in fields]
            if len(found) != 1:
                raise IncompatibleTransformers(f"{cls.__name__} has no single cache field among {list(CACHE_NAMES)}")
            return found[0]
    return default


def language_model_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a LLaVA-family model (`model.model.language_model`, with `.layers`, `.norm`)."""
    inner = getattr(model, "model", None)
    language_model = getattr(inner, "language_model", None)
    config = getattr(model, "config", None)
    if (
        language_model is None
        or getattr(config, "image_token_id", None) is None
        or not hasattr(language_model, "layers")
        or not hasattr(model, "lm_head")
    ):
        raise TypeError(
            f"epic needs a LLaVA-family model (e.g. LlavaForConditionalGeneration) with "
            f"`model.language_model.layers` and `config.image_token_id`; got {type(model).__name__}"
        )
    return language_model


def _find_cache(values: dict[str, Any], known: tuple[str, ...], where: str) -> Cache | None:
    """The cache under the first of the `known` names; a cache under any other name is an error (a rename)."""
    for name, value in values.items():
        if isinstance(value, Cache) and name not in known:
            raise IncompatibleTransformers(
                f"{where} received its KV cache as `{name}`, but epic resolved the name(s) {list(known)}"
            )
    return next((values[name] for name in known if values.get(name) is not None), None)


@dataclass(frozen=True)
class Layout:
    """The names the installed transformers uses for one model, resolved from its signatures at attach time.

    Attributes:
        model_cache: the cache keyword of the model's `forward` (what `generate` passes).
        model_cache_aliases: older names its `forward` still accepts through a deprecation shim.
        layer_cache: the cache keyword a decoder layer's forward pre-hook sees.
        output_cache: the cache field of the model's outputs.
        mask_cache: the cache keyword of the mask functions.
        causal_mask, sliding_window_mask: transformers' mask builders (`masking_utils`).
    """

    model_cache: str
    model_cache_aliases: tuple[str, ...]
    layer_cache: str
    output_cache: str
    mask_cache: str
    causal_mask: Callable
    sliding_window_mask: Callable

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        """Resolve every name for `model` (a LLaVA-family model); an unknown layout fails here, loudly."""
        import transformers.masking_utils as masking

        layer = language_model_of(model).layers[0]
        model_cache = _cache_keyword(type(model).forward, f"{type(model).__name__}.forward")
        layer_cache = _cache_keyword(type(layer).forward, f"{type(layer).__name__}.forward (the decoder layer)")
        causal_mask, sliding_window_mask = masking.create_causal_mask, masking.create_sliding_window_causal_mask
        mask_cache = _cache_keyword(causal_mask, "masking_utils.create_causal_mask")
        for function in (causal_mask, sliding_window_mask):
            missing = [name for name in (*MASK_PARAMETERS, mask_cache) if name not in _parameters(function)]
            if missing:
                raise IncompatibleTransformers(f"masking_utils.{function.__name__} has no parameter(s) {missing}")
        return cls(
            model_cache=model_cache,
            model_cache_aliases=CACHE_NAMES[CACHE_NAMES.index(model_cache) + 1 :],  # the shim still maps older ones
            layer_cache=layer_cache,
            output_cache=_output_cache_field(type(model).forward, model_cache),
            mask_cache=mask_cache,
            causal_mask=causal_mask,
            sliding_window_mask=sliding_window_mask,
        )

    def model_cache_in(self, inputs: dict[str, Any]) -> Cache | None:
        """The cache passed to the model's `forward` (under its name or a deprecated alias)."""
        return _find_cache(inputs, (self.model_cache, *self.model_cache_aliases), "the model's forward")

    def layer_cache_in(self, kwargs: dict[str, Any]) -> Cache | None:
        """The cache a decoder layer received."""
        return _find_cache(kwargs, (self.layer_cache,), "a decoder layer")

    def without_cache(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A decoder layer's keyword arguments with no cache at all (a teacher's suffix never writes to one).

        A cache under a name not in `CACHE_NAMES` stays; `layer_cache_in` (which the engine calls on these
        kwargs first) and `run_suffix`'s `check_no_cache` refuse it."""
        kept = {name: value for name, value in kwargs.items() if name not in CACHE_NAMES}
        return {**kept, self.layer_cache: None, "use_cache": False}

    def with_cache(self, cache: Cache | None) -> dict[str, Any]:
        """The keyword argument that passes `cache` to the model's `forward`."""
        return {self.model_cache: cache}

    def output_cache_of(self, output: Any) -> Cache | None:
        """The cache a model's output carries (None for tuple outputs and outputs without one)."""
        if not isinstance(output, ModelOutput):
            return None
        fields = [field.name for field in dataclasses.fields(output)]
        if self.output_cache not in fields:
            raise IncompatibleTransformers(f"{type(output).__name__} has no field `{self.output_cache}`")
        return getattr(output, self.output_cache)

    def mask(
        self,
        sliding: bool,
        *,
        config: PreTrainedConfig,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Cache | None,
        position_ids: torch.Tensor,
        layer_idx: int,
        and_mask_function: Callable | None,
    ) -> Any:
        """transformers' causal (or sliding-window) mask for the given 2D `attention_mask` and cache."""
        make = self.sliding_window_mask if sliding else self.causal_mask
        return make(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            layer_idx=layer_idx,
            and_mask_function=and_mask_function,
            **{self.mask_cache: cache},
        )


def cache_length(cache: Cache, layer_idx: int = 0) -> int:
    """Positions held by `cache` at decoder layer `layer_idx`."""
    return cache.get_seq_length(layer_idx)


def cache_layer_count(cache: Cache) -> int:
    """Decoder layers a cache holds states for."""
    return len(_cache_layers(cache))


def cache_tensors(cache: Cache) -> Iterator[torch.Tensor]:
    """The key and value tensors a cache holds, layer by layer (to measure it, not to change it)."""
    for cache_layer in _cache_layers(cache):
        for tensor in (getattr(cache_layer, "keys", None), getattr(cache_layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                yield tensor


def _cache_layers(cache: Cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise IncompatibleTransformers(f"{type(cache).__name__} has no per-layer `layers`")
    return list(layers)


def attended_length(cache: Cache, query_length: int, layer_idx: int) -> int:
    """Key length that layer `layer_idx` attends over when `query_length` new tokens join `cache`."""
    return cache.get_mask_sizes(query_length, layer_idx)[0]


def mask_key_length(mask: Any) -> int | None:
    """Key length of an attention mask ([B, 1, q, kv], a 2D [B, kv] flash mask, or a block mask); None when there is
    none (sdpa's causal shortcut), which attends over whatever the cache holds."""
    shape = getattr(mask, "shape", None)
    return None if shape is None else int(shape[-1])


def check_mask_fits_cache(mask: Any, cache: Cache, query_length: int, layer_idx: int) -> None:
    """Fail unless `mask` covers exactly the keys layer `layer_idx` will attend over: a mask built for another cache
    (e.g. the uncompressed one) would mix up positions silently."""
    keys = mask_key_length(mask)
    expected = attended_length(cache, query_length, layer_idx)
    if keys is not None and keys != expected:
        raise RuntimeError(
            f"decoder layer {layer_idx}: the attention mask covers {keys} keys but its KV cache holds "
            f"{expected - query_length} positions plus {query_length} new ones; the cache and the compression "
            "plan disagree"
        )


def check_no_cache(kwargs: dict[str, Any], where: str) -> None:
    """Fail if any keyword argument holds a KV cache (`where` would write into somebody else's)."""
    for name, value in kwargs.items():
        if isinstance(value, Cache):
            raise RuntimeError(f"{where} received a KV cache (`{name}`); it must run without one")


def attention_implementation(config: PreTrainedConfig) -> str:
    """The attention implementation a config names ("eager" when unset)."""
    return config._attn_implementation or "eager"


def set_attention_implementation(config: PreTrainedConfig, name: str) -> None:
    """Make modules built from (or already reading) `config` use the attention implementation `name`."""
    config._attn_implementation = name


def with_attention_implementation(config: PreTrainedConfig, name: str) -> PreTrainedConfig:
    """A shallow copy of `config` that routes attention through the registered function `name`."""
    routed = copy.copy(config)
    routed._attn_implementation_internal = name
    return routed


def register_attention(name: str, function: Callable) -> None:
    """Register an attention function with transformers under `name` (idempotent)."""
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, function)


def attention_function(name: str, eager: Callable) -> Callable:
    """The attention function transformers runs for `name` (`eager` for "eager")."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, eager)


def last_query_and_keys(
    layer: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple, last: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder `layer`'s post-RoPE query at position `last[b]` of each row ([B, H, hd]) and its keys at every
    position ([B, kv_heads, L, hd]), computed on `hidden_states` ([B, L, d], what enters the layer) as its attention
    would: input norm, q/k projections, the family's q/k norms where it has them, its RoPE. A scoring pass that
    projects one query row and never the values (the names are those every supported family uses)."""
    norm, attention = getattr(layer, "input_layernorm", None), getattr(layer, "self_attn", None)
    if norm is None or not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "head_dim")):
        raise IncompatibleTransformers(f"{type(layer).__name__} has no `input_layernorm` and `self_attn.q_proj/k_proj`")
    normed = norm(hidden_states)  # [B, L, d]
    batch_size, length, _ = normed.shape
    rows = torch.arange(batch_size, device=normed.device)
    last = last.to(normed.device)
    query = attention.q_proj(normed[rows, last][:, None]).view(batch_size, 1, -1, attention.head_dim)
    key = attention.k_proj(normed).view(batch_size, length, -1, attention.head_dim)
    if hasattr(attention, "q_norm"):  # Qwen3, Gemma3: a norm over each head's vector before RoPE
        query, key = attention.q_norm(query), attention.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)  # [B, H, 1, hd], [B, kv, L, hd]
    cos, sin = (part.expand(batch_size, -1, -1) for part in position_embeddings)  # [B, L, hd]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rotate = getattr(inspect.getmodule(type(attention)), "apply_rotary_pos_emb", apply_rotary_pos_emb)
    query, _ = rotate(query, query, cos[rows, last][:, None], sin[rows, last][:, None])
    _, key = rotate(key, key, cos, sin)
    return query[:, :, 0], key


@dataclass(frozen=True)
class VisionScoring:
    """Where a LLaVA model's image features come from, for methods that read the vision tower's attention.

    layer: the vision encoder layer whose output is the selected feature layer (`vision_feature_layer`);
    has_cls: whether the tower prepends a [CLS] token (CLIP does, SigLIP does not);
    drops_first: whether the features drop the tower's first token (`vision_feature_select_strategy="default"`);
    projector: the module projecting the features into the LLM (`multi_modal_projector`).
    """

    layer: nn.Module
    has_cls: bool
    drops_first: bool
    projector: nn.Module

    @classmethod
    def of(cls, model: nn.Module) -> VisionScoring:
        config, inner = model.config, getattr(model, "model", model)
        tower, projector = getattr(inner, "vision_tower", None), getattr(inner, "multi_modal_projector", None)
        vision_model = getattr(tower, "vision_model", tower)
        encoder = getattr(vision_model, "encoder", None)
        if projector is None or encoder is None or not hasattr(encoder, "layers"):
            raise IncompatibleTransformers(
                f"{type(model).__name__} has no `model.vision_tower...encoder.layers` and `model.multi_modal_projector`"
            )
        feature_layer = config.vision_feature_layer
        if not isinstance(feature_layer, int) or feature_layer == 0:
            raise ValueError(
                f"reading the vision tower's attention needs one vision_feature_layer after the embeddings; this "
                f"model's is {feature_layer!r}"
            )
        layers = encoder.layers
        index = feature_layer - 1 if feature_layer > 0 else len(layers) + feature_layer  # hidden_states[i] = out of i-1
        layer = layers[index]
        attention = getattr(layer, "self_attn", None)
        if not hasattr(layer, "layer_norm1") or not all(
            hasattr(attention, name) for name in ("q_proj", "k_proj", "num_heads", "head_dim", "scale")
        ):
            raise IncompatibleTransformers(f"{type(layer).__name__} has no `layer_norm1` and `self_attn.q_proj/k_proj`")
        has_cls = hasattr(getattr(vision_model, "embeddings", None), "class_embedding")
        drops_first = config.vision_feature_select_strategy == "default"
        return cls(layer, has_cls, drops_first, projector)

    def attention_and_keys(self, hidden_states: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """On what enters the scoring layer ([N, T, d_v], T tokens per image with any [CLS]): the attention each
        token receives ([N, T] fp32, summed over heads) from the [CLS] query, or averaged over every query where
        the tower has no [CLS] (in chunks of `chunk` queries: never the T x T map at once); and the layer's keys
        averaged over heads ([N, T, hd], VisionZip's similarity metric)."""
        attention = self.layer.self_attn
        normed = self.layer.layer_norm1(hidden_states)
        batch_size, length, _ = normed.shape
        heads, head_dim = attention.num_heads, attention.head_dim
        key = attention.k_proj(normed).view(batch_size, length, heads, head_dim).transpose(1, 2)  # [N, H, T, hd]
        queries = normed[:, :1] if self.has_cls else normed
        received = torch.zeros(batch_size, length, dtype=torch.float32, device=normed.device)
        for start in range(0, queries.shape[1], chunk):
            query = attention.q_proj(queries[:, start : start + chunk])  # [N, q, d_v]
            query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # [N, H, q, hd]
            weights = (query.float() @ key.float().transpose(-1, -2) * attention.scale).softmax(dim=-1)  # [N,H,q,T]
            received += weights.sum(dim=(1, 2))
        if not self.has_cls:
            received /= length
        return received, key.mean(dim=1)


def eager_attention_of(module: nn.Module) -> Callable:
    """The eager attention function of `module`'s model family (Llama's when the family has none of its own)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return getattr(inspect.getmodule(type(module)), "eager_attention_forward", eager_attention_forward)


def image_features(output: Any) -> torch.Tensor:
    """The projected features of every image of a LLaVA forward, concatenated: [image tokens, d].

    (5.24 moved them to `image_outputs.pooler_output`, one tensor per image, and deprecated `image_hidden_states`.)
    """
    image_outputs = getattr(output, "image_outputs", None)
    features = image_outputs.pooler_output if image_outputs is not None else output["image_hidden_states"]
    parts = features if isinstance(features, list | tuple) else [features]
    return torch.cat([part.reshape(-1, part.shape[-1]) for part in parts])


@contextmanager
def whole_parameters() -> Iterator[None]:
    """Build a model with whole parameters even under ZeRO-3 (transformers' random init cannot run on partitioned
    weights); the DeepSpeed engine partitions them when training starts."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hasattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref"):
        raise IncompatibleTransformers("transformers.integrations.deepspeed has no `_hf_deepspeed_config_weak_ref`")
    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = reference


def check_trainer_overrides(trainer: type) -> None:
    """Fail unless the Trainer still has the private methods epic's trainer overrides, with the same parameters."""
    for name, expected in TRAINER_OVERRIDES.items():
        method = getattr(trainer, name, None)
        if method is None:
            raise IncompatibleTransformers(f"Trainer has no method `{name}` (epic's trainer overrides it)")
        missing = [parameter for parameter in expected if parameter not in _parameters(method)]
        if missing:
            raise IncompatibleTransformers(f"Trainer.{name} has no parameter(s) {missing}")
