"""Attach visual-token compression to a stock transformers LLaVA model, from outside.

Layers 0..K-1 see every token; layers K..L-1 see the text tokens plus the kept visual tokens. Nothing of
the modeling code is copied:

- a forward pre-hook on the LLaVA model reads the batch: image-token positions per row (from
  `input_ids == image_token_id`), where the prompt ends, the 2D padding mask and the labels (which it
  holds back); a forward hook then computes the loss over the kept sequence with the model's own loss;
- layer K-1's attention module is routed through a registered attention function that reads its queries
  and keys: the attention row of the last prompt token (FastV) and the key norms (DART), one row only;
- a forward pre-hook on layer K picks the kept tokens and gathers the hidden states; pre-hooks on every
  layer >= K swap in the gathered position ids, rotary (cos, sin) and an attention mask rebuilt with
  transformers' own mask functions for the shorter sequence (or, when decoding, the shorter KV cache).

Kept rows are left-filled to a common length, so the last position of every row is still the last input
position (what `generate` reads). Every per-forward plan is keyed by that forward's rotary tensor, so
gradient checkpointing recomputes layers with exactly the same selection.
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from epic.compat import (
    Layout,
    attended_length,
    attention_implementation,
    cache_length,
    check_mask_fits_cache,
    check_no_cache,
    eager_attention_of,
    language_model_of,
)
from epic.compression.attention import ScoringCall, ensure_registered, routed_config
from epic.compression.registry import CompressionMethod, build_method
from epic.compression.selection import ImageSelection

IGNORE_INDEX = -100


DEFAULT_KEPT_FRACTION = 1 / 9  # the commands' default budget: N/9 (64 of LLaVA-1.5's 576, the paper's headline)


def default_tokens(image_tokens: int) -> int:
    """Visual tokens a command keeps when no budget is given: N/9 of the image's, at least one."""
    return max(1, round(image_tokens * DEFAULT_KEPT_FRACTION))


@dataclass(frozen=True)
class Budget:
    """Kept visual tokens per image: an exact count, or a ratio r meaning `round(N * (1 - r))`."""

    tokens: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.ratio is None):
            raise ValueError(f"give exactly one of tokens= or ratio= (got tokens={self.tokens}, ratio={self.ratio})")
        if self.tokens is not None and (isinstance(self.tokens, bool) or self.tokens < 0):
            raise ValueError(f"tokens must be a non-negative integer, got {self.tokens!r}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must lie in [0, 1), got {self.ratio!r}")

    def resolve(self, image_tokens: int) -> int:
        """The exact number of tokens to keep from an image of `image_tokens` visual tokens."""
        tokens = self.tokens if self.tokens is not None else round(image_tokens * (1.0 - self.ratio))
        if tokens > image_tokens:
            raise ValueError(
                f"budget of {tokens} visual tokens is larger than the image ({image_tokens} visual tokens)"
            )
        return tokens


@dataclass
class _Batch:
    """What the model-level pre-hook learned about one prefill / training forward."""

    attention_mask: torch.Tensor  # [B, L] bool, True at real tokens
    image_mask: torch.Tensor  # [B, L] bool, True at image tokens
    images: list[list[torch.Tensor]]  # per row, per image: its input positions
    prompt_last: torch.Tensor  # [B] index of the last prompt token
    text_positions: list[torch.Tensor]  # per row: prompt text positions
    labels: torch.Tensor | None  # [B, L], held back from the model
    loss_kwargs: dict[str, Any]
    logits_mask: torch.Tensor | None = None  # [B, L] bool: positions whose logits are wanted (original coordinates)
    attention: torch.Tensor | None = None  # [B, L] from layer K-1
    key_norms: torch.Tensor | None = None  # [B, L] from layer K-1
    kept: list[list[torch.Tensor]] = field(default_factory=list)  # per row, per image: kept positions
    plan: _Plan | None = None


@dataclass
class _Plan:
    """How one forward runs from layer K on: which positions survive and the per-layer inputs."""

    gather_index: torch.Tensor | None  # [B, L'] input position of each slot (None when decoding)
    valid: torch.Tensor | None  # [B, L'] False at filler slots
    attention_mask: torch.Tensor  # [B, kv'] 2D mask over every cache slot of the compressed layers
    slot_positions: torch.Tensor  # [B, kv'] original position of every cache slot (for sliding windows)
    position_ids: torch.Tensor | None  # gathered; None when decoding (the stock ones are right)
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    masks: dict[str, Any] = field(default_factory=dict)  # per attention type
    logit_slots: torch.Tensor | None = None  # [B, L'] slots whose logits are wanted (a boolean logits_to_keep)


@dataclass
class _CacheRecord:
    """What decoding needs from the prefill that filled a KV cache."""

    cache: weakref.ReferenceType
    attention_mask: torch.Tensor | None  # [B, kv'] 2D mask of the compressed cache; None when it had no image
    slot_positions: torch.Tensor | None  # [B, kv'] original positions of the compressed cache's slots
    original_length: int


@dataclass
class Prefix:
    """What entered the compression layer in the last forward with images (see `compress(record_prefix=True)`)."""

    hidden_states: torch.Tensor  # [B, L, d], detached, before any token was dropped
    layer_kwargs: dict[str, Any]  # that layer's other inputs: mask, position ids, rotary (cos, sin); no cache
    batch: _Batch


def _last_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True per row of a [B, L] bool tensor."""
    length = mask.shape[1]
    return length - 1 - mask.flip(1).int().argmax(dim=1)


def _wanted_slots(wanted: torch.Tensor, gather_index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, L'] slots of the compressed sequence holding the `wanted` positions ([B, L] bool, original coordinates)."""
    slots = wanted.to(valid.device).gather(1, gather_index) & valid
    if int(slots.sum()) != int(wanted.sum()):
        raise ValueError("logits were asked for at positions that compression dropped (visual tokens)")
    return slots


def _mlp_at_rows(mlp: nn.Module, rows: Callable[[], torch.Tensor | None]) -> list[RemovableHandle]:
    """Hooks that run a position-wise `mlp` ([B, L, d] -> [B, L, d]) only where `rows()` ([B, L] bool) is True and
    give zeros elsewhere; inactive while `rows()` is None.

    The layer's output is then exact at those rows and its residual alone at the others, so only those rows may be
    read: this is for the last decoder layer, when only some positions' logits are used (training).
    """

    def before(module: nn.Module, args: tuple) -> tuple | None:
        mask = rows()
        return None if mask is None else (args[0][mask],)

    def after(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        mask = rows()
        if mask is None:
            return None
        return output.new_zeros(*mask.shape, output.shape[-1]).index_put((mask,), output)

    return [mlp.register_forward_pre_hook(before), mlp.register_forward_hook(after)]


class Compression:
    """A live compression attached to a model; use as a context manager or call `remove()`.

    Attributes (after a forward with images):
        kept: per row, the input positions of the visual tokens kept past `layer` (sorted LongTensor).
        original_positions: [B, L'] input position of each slot of the compressed sequence (-1 at filler).
        tokens_per_image: visual tokens per image seen in the last forward.
        scoring_seconds: wall time spent scoring and selecting (synchronised on GPU when `profile=True`).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | CompressionMethod,
        budget: Budget,
        layer: int,
        seed: int,
        profile: bool,
        options: dict[str, Any],
        record_prefix: bool = False,
        trim_last_layer: bool = False,
    ) -> None:
        self.model = model
        self.language_model = language_model_of(model)
        self.layout = Layout.of(model)  # the installed transformers' names, resolved once (an unknown one fails here)
        self.text_config = model.config.text_config
        layers = self.language_model.layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < len(layers):
            raise ValueError(
                f"compression layer must be an integer in [1, {len(layers) - 1}] for a model with "
                f"{len(layers)} decoder layers; got {layer!r}"
            )
        if isinstance(method, str):
            self.method = build_method(method, **options)
        elif options:
            raise ValueError(f"method options {sorted(options)} only apply when the method is given by name")
        else:
            self.method = method
        self.budget = budget
        self.layer = layer
        self.profile = profile
        self.image_token_id = model.config.image_token_id
        self.generator = torch.Generator().manual_seed(seed)
        self.kept: list[torch.Tensor] | None = None
        self.original_positions: torch.Tensor | None = None
        self.tokens_per_image: int | None = None
        self.scoring_seconds = 0.0
        self.record_prefix = record_prefix
        self.prefix: Prefix | None = None
        self.trim_last_layer = trim_last_layer
        last_mlp = getattr(layers[-1], "mlp", None)
        if trim_last_layer and not isinstance(last_mlp, nn.Module):
            raise ValueError(
                f"trim_last_layer needs decoder layers with a position-wise `mlp` module; {type(layers[-1]).__name__} "
                "has none"
            )

        self._signature = inspect.signature(model.forward)
        self._layer_types = [self._attention_type(i) for i in range(len(layers))]
        self._batch: _Batch | None = None
        self._decoding = False
        self._active = False
        self._paused = False
        self._decode_mask: torch.Tensor | None = None
        self._plans: WeakIdKeyDictionary = WeakIdKeyDictionary()  # rotary cos of a forward -> _Plan
        self._cache_record: _CacheRecord | None = None
        self._handles: list[RemovableHandle] = []
        self._mlp_rows: torch.Tensor | None = None  # [B, L'] where the last layer's MLP runs (None: everywhere)

        self._check_budget_against_config()
        ensure_registered()
        scoring_module = layers[layer - 1].self_attn
        self._scoring_module = scoring_module
        self._routed_before = scoring_module.config  # restored on removal (another compression may have routed it)
        passthrough = getattr(scoring_module.config, "_epic_passthrough", None)
        self._original_config = passthrough.config if passthrough is not None else scoring_module.config
        self._eager = eager_attention_of(scoring_module)
        scoring_module.config = routed_config(self._original_config, self._eager)
        self._handles.append(model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after_model, with_kwargs=True))
        self._handles.append(model.get_output_embeddings().register_forward_pre_hook(self._before_lm_head))
        self._handles.append(layers[layer - 1].register_forward_pre_hook(self._before_scoring_layer, with_kwargs=True))
        for index in range(layer, len(layers)):
            hook = self._layer_pre_hook(index)
            self._handles.append(layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        if trim_last_layer:
            self._handles += _mlp_at_rows(last_mlp, lambda: None if self._paused else self._mlp_rows)

    # ----------------------------------------------------------------------------------------- life cycle
    def remove(self) -> None:
        """Detach every hook and restore the stock model exactly (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._scoring_module.config = self._routed_before
        self._plans = WeakIdKeyDictionary()
        self._batch = None
        self._cache_record = None
        self._mlp_rows = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Let the model run uncompressed by this handle for a while (another compression may run meanwhile)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def __enter__(self) -> Compression:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    # ----------------------------------------------------------------------------------------- suffix runs
    def _begin_suffix(self, batch: _Batch, scores_ready: bool, logits_mask: torch.Tensor) -> None:
        """Act as if a forward of `batch` asking for the logits at `logits_mask` had run up to here (see
        `run_suffix`)."""
        self._batch = _Batch(
            batch.attention_mask,
            batch.image_mask,
            batch.images,
            batch.prompt_last,
            batch.text_positions,
            labels=None,
            loss_kwargs={},
            logits_mask=logits_mask,
            attention=batch.attention if scores_ready else None,
            key_norms=batch.key_norms if scores_ready else None,
        )
        self._active, self._decoding = True, False

    def _end_suffix(self) -> _Batch:
        batch, self._batch, self._active = self._batch, None, False
        if batch.plan is not None:
            self.original_positions = torch.where(batch.plan.valid, batch.plan.gather_index, -1)
            self.kept = [
                torch.cat(row).sort().values if row else torch.empty(0, dtype=torch.long) for row in batch.kept
            ]
        return batch

    # ----------------------------------------------------------------------------------------- validation
    def _check_budget_against_config(self) -> None:
        """Fail at attach time when the vision config already tells the budget cannot fit."""
        vision = getattr(self.model.config, "vision_config", None)
        image_size, patch_size = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
        if not isinstance(image_size, int) or not isinstance(patch_size, int):
            return
        tokens = (image_size // patch_size) ** 2
        if getattr(self.model.config, "vision_feature_select_strategy", "default") == "full":
            tokens += 1
        self.budget.resolve(tokens)

    def _attention_type(self, index: int) -> str:
        layer_types = getattr(self.text_config, "layer_types", None)
        if layer_types is not None:
            return layer_types[index]
        return "sliding_attention" if getattr(self.text_config, "sliding_window", None) else "full_attention"

    @contextmanager
    def _timed(self) -> Iterator[None]:
        sync = self.profile and torch.cuda.is_available()
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if sync:
            torch.cuda.synchronize()
        self.scoring_seconds += time.perf_counter() - start

    # ----------------------------------------------------------------------------------------- model hooks
    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._paused:
            return None
        self.prefix = None
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        inputs = {**bound.pop("kwargs", {}), **bound}
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError("epic.compress needs input_ids to find the image tokens (got inputs_embeds only)")
        image_mask = input_ids == self.image_token_id
        cache = self.layout.model_cache_in(inputs)
        self._batch = None
        self._active = True
        self._decoding = cache is not None and cache_length(cache) > 0
        if self._decoding:
            self._check_decoding(cache, inputs)
            mask = inputs.get("attention_mask")
            if mask is None:
                mask = torch.ones(
                    input_ids.shape[0],
                    cache_length(cache) + input_ids.shape[1],
                    dtype=torch.bool,
                    device=input_ids.device,
                )
            self._decode_mask = mask
            return (), inputs
        if not image_mask.any():
            batch_size, length = input_ids.shape
            self.kept = [torch.empty(0, dtype=torch.long) for _ in range(batch_size)]
            self.original_positions = torch.arange(length, device=input_ids.device).expand(batch_size, -1)
            self._cache_record = None
            return (), inputs
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"epic.compress needs a 2D attention mask (got {attention_mask.dim()}D); static or "
                "compiled caches are not supported, use the default dynamic cache"
            )
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        labels = inputs.pop("labels", None)
        loss_kwargs = {key: inputs[key] for key in ("num_items_in_batch",) if key in inputs}
        logits_mask = inputs.get("logits_to_keep")
        if not (isinstance(logits_mask, torch.Tensor) and logits_mask.dtype == torch.bool):
            logits_mask = None
        elif logits_mask.shape != input_ids.shape or labels is not None:
            raise ValueError("a boolean logits_to_keep must be [batch, length] like input_ids and comes without labels")
        self._batch = self._read_batch(inputs, image_mask, valid, labels, loss_kwargs, logits_mask)
        if logits_mask is not None:
            inputs["logits_to_keep"] = 0  # the projection of those rows happens at the LM head
        return (), inputs

    def _check_decoding(self, cache: Any, inputs: dict[str, Any]) -> None:
        record = self._cache_record
        if record is None or record.cache() is not cache:
            raise ValueError(
                "this KV cache was not filled by a prefill under this compression; run the prefill "
                "(or generate) inside the same epic.compress block"
            )
        if inputs.get("pixel_values") is not None or inputs.get("mm_encoder_outputs"):
            raise ValueError("continuing a compressed KV cache with new images is not supported")

    def _read_batch(
        self,
        inputs: dict[str, Any],
        image_mask: torch.Tensor,
        valid: torch.Tensor,
        labels: torch.Tensor | None,
        loss_kwargs: dict[str, Any],
        logits_mask: torch.Tensor | None = None,
    ) -> _Batch:
        """Find images per row, the end of each prompt and its text tokens.

        The prompt ends before the first supervised label; without labels, a boolean `logits_to_keep` marks the
        positions whose next token is supervised (training without labels passed to the model), so its first True
        is the last prompt token; otherwise the prompt is the whole non-padding input (inference).
        """
        batch_size, length = image_mask.shape
        n_images = self._count_images(inputs)
        total = int(image_mask.sum())
        if n_images == 0 or total % n_images:
            raise ValueError(
                f"input_ids hold {total} image tokens for {n_images} image(s): the image-token count does "
                "not match the images"
            )
        per_image = total // n_images
        self.tokens_per_image = per_image
        self.budget.resolve(per_image)

        if labels is not None:
            supervised = labels != IGNORE_INDEX
            prompt_end = torch.where(supervised.any(dim=1), supervised.int().argmax(dim=1), _last_true(valid) + 1)
        elif logits_mask is not None:
            wanted = logits_mask.to(valid.device)
            prompt_end = torch.where(wanted.any(dim=1), wanted.int().argmax(dim=1) + 1, _last_true(valid) + 1)
        else:
            prompt_end = _last_true(valid) + 1
        prompt_last = prompt_end - 1
        positions = torch.arange(length, device=image_mask.device)
        images, text_positions = [], []
        for row in range(batch_size):
            if not valid[row].any() or prompt_last[row] < 0:
                raise ValueError(f"row {row} has no prompt (no real token before its first supervised label)")
            row_images = image_mask[row].nonzero().squeeze(1)
            if row_images.numel() % per_image:
                raise ValueError(
                    f"row {row} holds {row_images.numel()} image tokens, not a multiple of the "
                    f"{per_image} tokens per image"
                )
            if row_images.numel() and row_images.max() > prompt_last[row]:
                raise ValueError(
                    f"row {row} has image tokens after its first supervised label; images must sit in the prompt"
                )
            images.append(list(row_images.split(per_image)) if row_images.numel() else [])
            in_prompt = valid[row] & ~image_mask[row] & (positions <= prompt_last[row])
            text_positions.append(in_prompt.nonzero().squeeze(1))
        return _Batch(valid, image_mask, images, prompt_last, text_positions, labels, loss_kwargs, logits_mask)

    @staticmethod
    def _count_images(inputs: dict[str, Any]) -> int:
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            if pixel_values.dim() != 4:
                raise ValueError(
                    f"epic.compress supports one [3, H, W] tensor per image (pixel_values of shape "
                    f"[images, 3, H, W]); got shape {tuple(pixel_values.shape)}"
                )
            return pixel_values.shape[0]
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            return len(encoded.pooler_output)
        raise ValueError("input_ids contain image tokens but neither pixel_values nor mm_encoder_outputs were given")

    def _after_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._paused:
            return output
        batch, self._batch, self._active = self._batch, None, False
        if self._decoding:
            return output
        cache = self.layout.output_cache_of(output)
        if batch is None:
            if cache is not None:
                self._cache_record = _CacheRecord(weakref.ref(cache), None, None, 0)
            return output
        plan = batch.plan
        if plan is None:
            raise RuntimeError("the compression layer never ran: was the language model called?")
        self.original_positions = torch.where(plan.valid, plan.gather_index, -1)
        self.kept = [torch.cat(row).sort().values if row else torch.empty(0, dtype=torch.long) for row in batch.kept]
        if cache is not None:
            self._cache_record = _CacheRecord(
                weakref.ref(cache), plan.attention_mask, plan.slot_positions, batch.image_mask.shape[1]
            )
        if batch.labels is None:
            return output
        labels = torch.where(plan.valid, batch.labels.gather(1, plan.gather_index), IGNORE_INDEX)
        logits = output[0] if isinstance(output, tuple) else output.logits
        loss = module.loss_function(
            logits=logits, labels=labels, vocab_size=self.text_config.vocab_size, **batch.loss_kwargs
        )
        if isinstance(output, tuple):
            return (loss, *output)
        return type(output)(loss=loss, **{key: value for key, value in output.items() if key != "loss"})

    def _before_lm_head(self, module: nn.Module, args: tuple) -> tuple | None:
        """With a boolean `logits_to_keep` (original coordinates), project only those rows: logits are [N, V]."""
        batch = self._batch
        if self._paused or batch is None or batch.logits_mask is None or self._decoding:
            return None
        return (args[0][batch.plan.logit_slots],)

    # ----------------------------------------------------------------------------------------- layer hooks
    def _before_scoring_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._paused:
            return None
        batch = self._batch
        rotary = kwargs["position_embeddings"][0]
        capture = None
        if batch is not None and not self._decoding and rotary not in self._plans:
            capture = self._capture_for(batch)
        kwargs = {**kwargs, "epic_scoring": ScoringCall(self._original_config, self._eager, capture)}
        return args, kwargs

    def _capture_for(self, batch: _Batch) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], None]:
        def capture(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
            with torch.no_grad(), self._timed():
                batch.attention, batch.key_norms = self._score(module, query, key, batch)

        return capture

    @staticmethod
    def _score(
        module: nn.Module, query: torch.Tensor, key: torch.Tensor, batch: _Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention row of each row's last prompt token (head-averaged) and key L1 norms, both [B, L]."""
        batch_size, heads, length, head_dim = query.shape
        kv_heads = key.shape[1]
        if key.shape[2] != length:
            raise RuntimeError(f"scoring expects a fresh prefill: {length} queries but {key.shape[2]} keys")
        last = batch.prompt_last.to(query.device)
        rows = torch.arange(batch_size, device=query.device)
        query_last = query[rows, :, last].float().view(batch_size, kv_heads, heads // kv_heads, head_dim)
        logits = torch.einsum("bgrd,bgld->bgrl", query_last, key.float()) * module.scaling  # [B, g, r, L]
        positions = torch.arange(length, device=query.device)
        allowed = batch.attention_mask.to(query.device) & (positions[None, :] <= last[:, None])  # [B, L]
        logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
        attention = logits.softmax(dim=-1).mean(dim=(1, 2))  # [B, L]
        key_norms = key.float().abs().sum(dim=(1, 3))  # [B, L]
        return attention, key_norms

    def _layer_pre_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            return self._before_compressed_layer(index, args, kwargs)

        return hook

    def _before_compressed_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._paused:
            return None
        last_layer = index == len(self._layer_types) - 1
        if last_layer:
            self._mlp_rows = None
        if args:
            hidden_states, args = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden_states = kwargs.pop("hidden_states")
        cache = self.layout.layer_cache_in(kwargs)
        if self._decoding and cache is None:
            raise RuntimeError(
                f"decoding a compressed KV cache, but decoder layer {index} received no cache: its attention mask "
                "would not match the cache"
            )
        rotary = kwargs["position_embeddings"][0]
        plan = self._plans.get(rotary)
        if plan is None:
            if not self._active:
                raise RuntimeError(
                    "a decoder layer ran under epic.compress outside a forward of the LLaVA model it is attached "
                    "to; call that model (not its inner language model)"
                )
            if index == self.layer:
                if self.record_prefix and self._batch is not None and not self._decoding:
                    self.prefix = Prefix(hidden_states.detach(), self.layout.without_cache(kwargs), self._batch)
                plan = self._new_plan(hidden_states, kwargs, cache)
            if plan is None:  # a forward without images (or decoding after one): nothing was compressed
                if cache is not None:
                    check_mask_fits_cache(kwargs.get("attention_mask"), cache, hidden_states.shape[1], index)
                return None
            self._plans[rotary] = plan
        if plan.gather_index is not None and index == self.layer:
            hidden_states = hidden_states.gather(
                1, plan.gather_index[..., None].expand(-1, -1, hidden_states.shape[-1])
            )
        if last_layer and self.trim_last_layer:
            self._mlp_rows = plan.logit_slots  # None without a boolean logits_to_keep, and when decoding
        kwargs = {**kwargs, "attention_mask": self._mask(plan, index)}
        if cache is not None:
            check_mask_fits_cache(kwargs["attention_mask"], cache, hidden_states.shape[1], index)
        if plan.position_ids is not None:
            kwargs["position_ids"] = plan.position_ids
            kwargs["position_embeddings"] = plan.position_embeddings
        return (hidden_states, *args), kwargs

    def _new_plan(self, hidden_states: torch.Tensor, kwargs: dict, cache: Any) -> _Plan | None:
        if self._decoding:
            return self._decode_plan(hidden_states, kwargs, cache)
        batch = self._batch
        if batch is None:
            return None
        if batch.attention is None:
            raise RuntimeError(f"layer {self.layer - 1} was not scored before layer {self.layer}")
        with torch.no_grad(), self._timed():
            keep = self._select(batch, hidden_states)  # [B, L] bool
        batch_size, length = keep.shape
        kept_length = int(keep.sum(dim=1).max())
        order = torch.argsort(keep.int(), dim=1, stable=True)  # dropped first, kept in input order last
        gather_index = order[:, length - kept_length :]  # [B, L']
        valid = keep.gather(1, gather_index)
        attention_mask = valid & batch.attention_mask.gather(1, gather_index)
        position_ids = kwargs["position_ids"].expand(batch_size, -1).gather(1, gather_index)
        cos, sin = kwargs["position_embeddings"]
        rotary_index = gather_index[..., None].expand(-1, -1, cos.shape[-1])
        position_embeddings = (
            cos.expand(batch_size, -1, -1).gather(1, rotary_index),
            sin.expand(batch_size, -1, -1).gather(1, rotary_index),
        )
        plan = _Plan(gather_index, valid, attention_mask, position_ids, position_ids, position_embeddings)
        if batch.logits_mask is not None:
            plan.logit_slots = _wanted_slots(batch.logits_mask, gather_index, valid)
        self._build_masks(plan, hidden_states.new_empty(batch_size, kept_length, 0), cache)
        batch.plan = plan
        return plan

    def _decode_plan(self, hidden_states: torch.Tensor, kwargs: dict, cache: Any) -> _Plan | None:
        """Decoding: nothing is pruned; layers >= K get a mask over their shorter cache plus the new tokens."""
        record = self._cache_record
        if record.attention_mask is None:
            return None  # the prefill had no image: layers >= K hold the full cache
        batch_size, query_length = hidden_states.shape[:2]
        new_mask = self._decode_mask[:, record.original_length :].bool()
        attention_mask = torch.cat([record.attention_mask, new_mask[:, -query_length:]], dim=1)
        step_positions = kwargs["position_ids"].expand(batch_size, -1)
        slot_positions = torch.cat([record.slot_positions, step_positions], dim=1)
        expected = cache_length(cache, self.layer) + query_length
        if attention_mask.shape[1] != expected:
            raise RuntimeError(
                f"compressed cache holds {cache_length(cache, self.layer)} positions at layer {self.layer} but "
                f"the attention mask implies {attention_mask.shape[1] - query_length}"
            )
        record.attention_mask, record.slot_positions = attention_mask, slot_positions
        plan = _Plan(None, None, attention_mask, slot_positions, None, None)
        self._build_masks(plan, hidden_states[..., :0], cache)
        return plan

    def _build_masks(self, plan: _Plan, shape_like: torch.Tensor, cache: Any) -> None:
        """One mask per attention type of layers >= K, built before any of them writes to the cache.

        Each is sized against the first layer of its type from K on. Sliding windows count original positions
        (the kept tokens keep their RoPE gaps), not slots of the shorter sequence.
        """
        implementation = attention_implementation(self.text_config)
        query_length = shape_like.shape[1]
        for kind in dict.fromkeys(self._layer_types[self.layer :]):
            layer_index = self._layer_types.index(kind, self.layer)
            window = getattr(self.text_config, "sliding_window", None) if kind == "sliding_attention" else None
            positions = plan.slot_positions
            window_binds = window is not None and int(positions.max() - positions.min()) >= window
            if "flash" in implementation:
                if window_binds:
                    raise NotImplementedError(
                        f"sliding-window layers (window {window}) over a compressed sequence that spans more "
                        "positions than the window are not supported under flash attention; use sdpa or eager"
                    )
                kv_length = (
                    plan.attention_mask.shape[1] if cache is None else attended_length(cache, query_length, layer_index)
                )
                plan.masks[kind] = plan.attention_mask[:, -kv_length:]
                continue
            within_window = None
            if window_binds:

                def within_window(batch_idx, head_idx, q_idx, kv_idx, positions=positions, window=window):
                    return positions[batch_idx, q_idx] - positions[batch_idx, kv_idx] < window

            plan.masks[kind] = self.layout.mask(
                kind == "sliding_attention",
                config=self.text_config,
                inputs_embeds=shape_like,
                attention_mask=plan.attention_mask,
                cache=cache,
                position_ids=plan.slot_positions[:, -query_length:],
                layer_idx=layer_index,
                and_mask_function=within_window,
            )

    def _select(self, batch: _Batch, hidden_states: torch.Tensor) -> torch.Tensor:
        """Run the method on every image of every row; return the [B, L] mask of surviving positions."""
        features = None
        if self.method.needs_features:
            features = self.language_model.norm(hidden_states)
        keep = ~batch.image_mask.to(hidden_states.device)
        batch.kept, expected = [], []
        for row, images in enumerate(batch.images):
            last = batch.prompt_last[row]
            row_kept = []
            for positions in images:
                positions = positions.to(hidden_states.device)
                forced = positions[positions == last]
                candidates = positions[positions != last]
                budget = max(self.budget.resolve(positions.numel()) - forced.numel(), 0)
                chosen = self.method.select(
                    ImageSelection(
                        positions=candidates,
                        budget=budget,
                        text_positions=batch.text_positions[row].to(hidden_states.device),
                        attention=batch.attention[row],
                        key_norms=batch.key_norms[row],
                        features=None if features is None else features[row],
                        generator=self.generator,
                    )
                )
                if chosen.numel() != budget:
                    raise RuntimeError(f"{type(self.method).__name__} kept {chosen.numel()} tokens, budget {budget}")
                row_kept.append(torch.cat([forced, chosen]))
            if row_kept:
                keep[row, torch.cat(row_kept)] = True
            expected.append(sum(kept.numel() for kept in row_kept))
            batch.kept.append([kept.cpu() for kept in row_kept])
        kept_visual = (keep & batch.image_mask.to(keep.device)).sum(dim=1)
        if not torch.equal(kept_visual.cpu(), torch.tensor(expected)):
            raise RuntimeError(
                f"{type(self.method).__name__} returned repeated positions or positions outside the image"
            )
        return keep

    def _mask(self, plan: _Plan, index: int) -> Any:
        """The attention mask for layer `index` over the compressed sequence."""
        return plan.masks[self._layer_types[index]]


def compress(
    model: nn.Module,
    method: str | CompressionMethod = "dart",
    *,
    tokens: int | None = None,
    ratio: float | None = None,
    layer: int = 2,
    seed: int = 0,
    profile: bool = False,
    record_prefix: bool = False,
    trim_last_layer: bool = False,
    **options: Any,
) -> Compression:
    """Compress the visual tokens of `model` before decoder layer `layer`.

    Args:
        model: a transformers LLaVA-family model (`LlavaForConditionalGeneration`).
        method: a registered method name (see `epic.compression.METHODS`) or a method instance.
        tokens: exact number of visual tokens kept per image; or
        ratio: fraction dropped, meaning `tokens = round(N * (1 - ratio))` for an image of N tokens.
        layer: K, the first decoder layer that sees the compressed sequence (1 <= K < num_layers).
        seed: seeds the generator of methods that draw at random.
        profile: synchronise the GPU around scoring so `scoring_seconds` is exact.
        record_prefix: keep what enters layer K in `.prefix`, so `run_suffix` can run the layers from K again under
            another compression without recomputing the layers below (a distillation teacher).
        trim_last_layer: in a forward with a boolean `logits_to_keep`, run the last decoder layer's MLP at those
            positions only: their logits are exact, the other positions of the final hidden states are left
            incomplete. Saves most of a layer in training steps that use only the supervised positions' logits.
        **options: the method's options, e.g. `pivots_image=4, pivots_text=4` for DART.

    Returns a `Compression` handle: a context manager, or call `.remove()` to detach it.
    """
    budget = Budget(tokens=tokens, ratio=ratio)
    return Compression(model, method, budget, layer, seed, profile, options, record_prefix, trim_last_layer)


def run_suffix(
    model: nn.Module, prefix: Prefix, start: int, logits_mask: torch.Tensor, compression: Compression | None = None
) -> torch.Tensor:
    """Logits [N, V] at the `logits_mask` positions (original coordinates, [B, L] bool) of a forward resumed at
    decoder layer `start` from `prefix` (recorded entering that layer), under `compression` or none.

    The layers below `start` are not run again: a teacher that compresses at or after the student's layer shares
    them. The last layer's MLP runs at the `logits_mask` positions only (see `compress(trim_last_layer=True)`).
    `compression` must be attached to `model` and compress at a layer >= `start`; pause any other compression
    attached to the same model meanwhile.
    """
    language_model = language_model_of(model)
    logits_mask = logits_mask.to(prefix.hidden_states.device)
    if compression is not None:
        if compression.layer < start:
            raise ValueError(f"a suffix from layer {start} cannot compress at layer {compression.layer}")
        compression._begin_suffix(prefix.batch, scores_ready=compression.layer == start, logits_mask=logits_mask)

    def slots(batch: _Batch | None) -> torch.Tensor:
        return logits_mask if batch is None or batch.plan is None else batch.plan.logit_slots

    def wanted_rows() -> torch.Tensor:  # read when the last layer's MLP runs, after any compression planned
        return slots(None if compression is None else compression._batch)

    last_mlp = getattr(language_model.layers[-1], "mlp", None)
    trims_itself = compression is not None and compression.trim_last_layer
    handles = _mlp_at_rows(last_mlp, wanted_rows) if isinstance(last_mlp, nn.Module) and not trims_itself else []
    hidden_states = prefix.hidden_states
    layer_kwargs = prefix.layer_kwargs  # recorded without the student's cache: the suffix never touches one
    check_no_cache(layer_kwargs, "the teacher's suffix")
    try:
        for layer in language_model.layers[start:]:
            hidden_states = layer(hidden_states, **layer_kwargs)
    finally:
        for handle in handles:
            handle.remove()
        batch = compression._end_suffix() if compression is not None else None
    return model.get_output_embeddings()(language_model.norm(hidden_states[slots(batch)]))
