"""Attach visual-token compression to a stock transformers LLaVA model, from outside: the hooks and their life cycle.

Layers 0..K-1 see every token; layers K..L-1 see the text tokens plus the kept visual tokens (K = 0: before the
LLM, every decoder layer sees the compressed sequence and there is no layer K-1 to score). With several stages
(K_1 < K_2 < ...), stage s's layers see what it kept from what stage s-1 kept: each later stage scores, selects
and gathers in the slot coordinates of the earlier one's sequence, the same steps as below. Nothing of the
modeling code is copied. A forward meets the hooks in this order:

1. the model's forward pre-hook reads the batch (`batch.read_layout`: images per row, where each prompt ends,
   padding) and holds the labels back;
2. layer K-1's attention is routed through a registered attention function (`attention.py`) that hands its
   post-RoPE queries and keys to a capture, which scores the prompt (`planning.score_prompt`): one attention row,
   never the L x L map;
3. layer K's pre-hook has the stage planner (`stage_planner.py`) select the kept tokens (`planning.select_kept`)
   and build the plan (`planning.gather_plan`, `planning.build_masks`), and gathers the hidden states; every
   layer >= K's pre-hook swaps in the plan's position ids, rotary (cos, sin) and masks (when decoding: a mask over
   the shorter KV cache, `planning.decode_plan`);
4. the LM head's pre-hook projects only the wanted rows (a boolean `logits_to_keep`);
5. the model's forward hook publishes what was kept and computes the loss over the kept sequence with the model's
   own loss function.

Every plan is keyed by its forward's rotary tensor, so gradient checkpointing recomputes layers with the same
selection. What one forward learns lives in one `forward.ForwardState`; `api.compress` builds the handle. The
handle's state, who sets it (->) and who reads it (<-):

    _forward        -> model pre-hook, run_suffix; cleared by the model hook and at the end of run_suffix
                    <- scoring capture (writes .scores), layer K (writes .plan, .kept), LM-head pre-hook
    _plans          -> each stage's layer, first run of a forward (one plan per stage)
                    <- every layer >= K (checkpoint recomputation too)
    _cache_record   -> model hook after a prefill; layer K when decoding (extends it)
                    <- model pre-hook (is this our cache?), layer K when decoding
    _mlp_rows       -> the last layer's pre-hook (its plan's logit_slots)   <- the last layer's MLP hooks
    _paused         -> paused()                              <- every hook (a paused handle does nothing)
    prefix          -> model pre-hook (clears), layer K (records)          <- the caller, for run_suffix
    kept, stage_kept, original_positions -> _publish (model hook, run_suffix), model pre-hook without images
                    <- the caller
    tokens_per_image -> model pre-hook; scoring_seconds -> the capture and the selection  <- the caller
"""

from __future__ import annotations

import inspect
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from epic.compat import Layout, cache_length, check_mask_fits_cache, language_model_of
from epic.compression.attention import ScoringRoute
from epic.compression.batch import read_prefill
from epic.compression.budget import configured_image_tokens
from epic.compression.decoding import CacheRecord, check_decoding
from epic.compression.families import Family
from epic.compression.forward import ForwardState
from epic.compression.planning import (
    Plan,
    attention_types,
)
from epic.compression.registry import (
    CompressionMethod,
    check_stage,
    needs_scores,
    needs_vision,
    resolve_method,
    scheduled_stages,
    scores_own_layer,
)
from epic.compression.stage_planner import StagePlanner
from epic.compression.stages import Stage, check_stages, stage_budgets
from epic.compression.suffix import Prefix, run_layers
from epic.compression.trimming import last_mlp_of, mlp_at_rows
from epic.compression.vision import VisionTap


class Compression:
    """A live compression attached to a model; use as a context manager or call `remove()`.

    Attributes (after a forward with images):
        kept: per row, the input positions of the visual tokens kept past the last stage (sorted LongTensor).
        stage_kept: per stage, per row, the input positions that stage kept (`stage_kept[-1]` is `kept`).
        original_positions: [B, L'] input position of each slot of the compressed sequence (-1 at filler).
        tokens_per_image: visual tokens per image seen in the last forward (None when images differ in size).
        image_sizes: per row, per image, its visual tokens in the last forward (dynamic resolution: they differ; an
            exact `tokens=` budget keeps a whole image that has fewer).
        scoring_seconds: wall time spent scoring and selecting (synchronised on GPU when `profile=True`).
        prefix: what entered `layer` in the last forward with images (with `record_prefix=True`), for `run_suffix`.
        stages: the stages (layer, budget) it prunes at; `layer` and `budget` are the first stage's.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | CompressionMethod,
        *,
        stages: Sequence[Stage],
        seed: int = 0,
        profile: bool = False,
        options: dict[str, Any] | None = None,
        record_prefix: bool = False,
        trim_last_layer: bool = False,
    ) -> None:
        self.model = model
        self.language_model = language_model_of(model)
        self.layout = Layout.of(model)  # the installed transformers' names, resolved once (an unknown one fails here)
        self.text_config = model.config.text_config
        layers = self.language_model.layers
        self.method = resolve_method(method, options)
        stages = scheduled_stages(self.method, check_stages(stages, len(layers)), len(layers))
        self.stages = check_stages(stages, len(layers))
        for stage in self.stages:
            check_stage(self.method, stage.layer)
        self.layer, self.budget = self.stages[0].layer, self.stages[0].budget
        self._stage_layers = [stage.layer for stage in self.stages]
        self._stage_of_layer = {  # decoder layer index -> the stage whose plan it runs under
            index: sum(index >= start for start in self._stage_layers) - 1 for index in range(self.layer, len(layers))
        }
        self.profile = profile
        self.family = Family.of(model)  # where its image tokens are (an unknown family fails here)
        self.image_token_id = self.family.image_token_id
        self.generator = torch.Generator().manual_seed(seed)
        self.kept: list[torch.Tensor] | None = None
        self.stage_kept: list[list[torch.Tensor]] | None = None
        self.original_positions: torch.Tensor | None = None
        self.tokens_per_image: int | None = None
        self.image_sizes: list[list[int]] | None = None
        self._told_capped = False
        self.scoring_seconds = 0.0
        self.record_prefix = record_prefix
        self.prefix: Prefix | None = None
        self.trim_last_layer = trim_last_layer
        last_mlp = last_mlp_of(self.language_model)
        if trim_last_layer and last_mlp is None:
            raise ValueError(
                f"trim_last_layer needs decoder layers with a position-wise `mlp` module; {type(layers[-1]).__name__} "
                "has none"
            )

        self._signature = inspect.signature(model.forward)
        self._layer_types = attention_types(self.text_config, len(layers))
        self._forward: ForwardState | None = None
        self._paused = False
        self._plans: WeakIdKeyDictionary = WeakIdKeyDictionary()  # rotary cos of a forward -> Plan
        self._cache_record: CacheRecord | None = None
        self._mlp_rows: torch.Tensor | None = None  # [B, L'] where the last layer's MLP runs (None: everywhere)
        self._handles: list[RemovableHandle] = []

        configured = configured_image_tokens(model.config)
        if configured is not None:  # fail at attach time when the config already tells the budget cannot fit
            stage_budgets(self.stages, configured)
        self._scoring: dict[int, ScoringRoute] = {}  # stage -> the attention module it scores with
        # the last thing that can refuse (the vision tower's layout), before any hook of this handle is attached
        self._vision = VisionTap(model, lambda: self._paused, self._timed) if needs_vision(self.method) else None
        self._handles.append(model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after_model, with_kwargs=True))
        self._handles.append(model.get_output_embeddings().register_forward_pre_hook(self._before_lm_head))
        own_scores = scores_own_layer(self.method)
        for stage, start in enumerate(self._stage_layers):
            # stage 0's scores also serve a teacher; an own-layer method (PDrop) scores in its stage layer's pre-hook
            if start > 0 and not own_scores and (stage == 0 or needs_scores(self.method)):
                self._scoring[stage] = ScoringRoute(layers[start - 1].self_attn)
                hook = self._scoring_pre_hook(stage)  # before the layer hooks: it keys on the stock rotary tensor
                self._handles.append(layers[start - 1].register_forward_pre_hook(hook, with_kwargs=True))
        for index in range(self.layer, len(layers)):
            hook = self._layer_pre_hook(index)
            self._handles.append(layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        if trim_last_layer:
            self._handles += mlp_at_rows(last_mlp, lambda: None if self._paused else self._mlp_rows)
        self._planner = StagePlanner(
            self.method,
            self.stages,
            self.layout,
            self.text_config,
            self._layer_types,
            self.language_model,
            self.generator,
            self._vision,
            self._timed,
            cap_budgets=self.family.dynamic,
        )

    # ----------------------------------------------------------------------------------------- life cycle
    def remove(self) -> None:
        """Detach every hook and restore the stock model exactly (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for route in reversed(self._scoring.values()):
            route.restore()
        self._scoring.clear()
        if self._vision is not None:
            self._vision.remove()
        self._plans = WeakIdKeyDictionary()
        self._forward = None
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

    def run_suffix(self, prefix: Prefix, start: int, logits_mask: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] at `logits_mask` ([B, L] bool, original coordinates) of the decoder layers from `start` run
        on `prefix` under this compression, as if a forward of the prefix's batch had run up to there.

        This compression must compress at a layer >= `start`; at `start` itself it reuses the scores recorded in
        the prefix (layer K-1 is not run again). `kept` and `original_positions` describe this suffix afterwards.
        """
        if self.layer < start:
            raise ValueError(f"a suffix from layer {start} cannot compress at layer {self.layer}")
        logits_mask = logits_mask.to(prefix.hidden_states.device)
        forward = ForwardState(
            layout=prefix.layout,
            logits_mask=logits_mask,
            scores=prefix.scores if self.layer == start else None,
            vision=prefix.vision,
        )

        def wanted_rows() -> torch.Tensor:  # read when the last layer's MLP runs, after this compression planned
            return logits_mask if forward.plan is None else forward.plan.logit_slots

        self._forward = forward
        try:
            rows = run_layers(self.model, prefix, start, wanted_rows, trim_last_mlp=not self.trim_last_layer)
        finally:
            self._forward = None
            if forward.plan is not None:
                self._publish(forward)
        return self.model.get_output_embeddings()(rows)

    # ----------------------------------------------------------------------------------------- helpers
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

    def _publish(self, forward: ForwardState) -> None:
        """Expose what a planned forward kept: `original_positions` of its slots, `stage_kept` and `kept` per row."""
        self.original_positions, self.stage_kept = forward.published()
        self.kept = self.stage_kept[-1]

    # ----------------------------------------------------------------------------------------- model hooks
    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._paused:
            return None
        self.prefix = None
        self._forward = None
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        inputs = {**bound.pop("kwargs", {}), **bound}
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError("epic.compress needs input_ids to find the image tokens (got inputs_embeds only)")
        cache = self.layout.model_cache_in(inputs)
        if cache is not None and cache_length(cache) > 0:
            check_decoding(self._cache_record, cache, inputs)
            batch_size, query_length = input_ids.shape
            seen = self._cache_record.seen  # the cache's length in original coordinates (layer 0's is shorter at K=0)
            mask = inputs.get("attention_mask")
            if mask is None:
                mask = torch.ones((batch_size, seen + query_length), dtype=torch.bool, device=input_ids.device)
            if self.layer == 0 and inputs.get("position_ids") is None:  # the model would count the shorter cache
                if self.family.dynamic:
                    raise ValueError(
                        f"decoding {self.family.model_type}'s cache compressed before the LLM needs position_ids "
                        "(generate passes them): its M-RoPE positions cannot be counted from the shorter cache"
                    )
                steps = torch.arange(seen, seen + query_length, device=input_ids.device)
                inputs["position_ids"] = steps.expand(batch_size, -1)
            self._forward = ForwardState(decode_mask=mask)
            return (), inputs
        if not (input_ids == self.image_token_id).any():
            batch_size, length = input_ids.shape
            self.kept = [torch.empty(0, dtype=torch.long) for _ in range(batch_size)]
            self.stage_kept = [self.kept for _ in self.stages]
            self.original_positions = torch.arange(length, device=input_ids.device).expand(batch_size, -1)
            self._cache_record = None
            self._forward = ForwardState()
            return (), inputs
        layout, labels, logits_mask = read_prefill(inputs, self.family)
        self.tokens_per_image = layout.tokens_per_image
        self.image_sizes = layout.image_sizes
        sizes = sorted({size for row in layout.image_sizes for size in row})
        for size in sizes:
            stage_budgets(self.stages, size, cap=self.family.dynamic)
        exact = [stage.budget.tokens for stage in self.stages if stage.budget.tokens is not None]
        if self.family.dynamic and exact and sizes[0] < max(exact) and not self._told_capped:
            self._told_capped = True  # once per handle
            warnings.warn(
                f"tokens={max(exact)} is more than some images have ({sizes[0]} visual tokens): those keep all "
                "their tokens (an exact budget is capped per image; ratio= scales with each image)",
                stacklevel=2,
            )
        loss_kwargs = {key: inputs[key] for key in ("num_items_in_batch",) if key in inputs}
        self._forward = ForwardState(layout=layout, labels=labels, loss_kwargs=loss_kwargs, logits_mask=logits_mask)
        return (), inputs

    def _after_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._paused:
            return output
        forward, self._forward = self._forward, None
        if forward is None or forward.decoding:
            return output
        cache = self.layout.output_cache_of(output)
        if forward.layout is None:
            if cache is not None:
                self._cache_record = CacheRecord(weakref.ref(cache), None, None, cache_length(cache))  # uncompressed
            return output
        plan = forward.plan
        if plan is None:
            raise RuntimeError("the compression layer never ran: was the language model called?")
        self._publish(forward)
        if cache is not None:
            length = forward.layout.image_mask.shape[1]
            masks = [stage_plan.attention_mask for stage_plan in forward.plans]
            positions = [stage_plan.slot_positions for stage_plan in forward.plans]
            self._cache_record = CacheRecord(weakref.ref(cache), masks, positions, length)
        if forward.labels is None:
            return output
        return forward.with_loss(module, output, self.text_config.vocab_size)

    def _before_lm_head(self, module: nn.Module, args: tuple) -> tuple | None:
        """With a boolean `logits_to_keep` (original coordinates), project only those rows: logits are [N, V]."""
        forward = self._forward
        if self._paused or forward is None or forward.logits_mask is None:
            return None
        return (args[0][forward.plan.logit_slots],)

    # ----------------------------------------------------------------------------------------- layer hooks
    def _scoring_pre_hook(self, stage: int) -> Callable:
        """The pre-hook of layer K_s - 1: route its attention through a capture while stage `stage` is unplanned."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._paused:
                return None
            forward = self._forward
            plans = self._plans.get(kwargs["position_embeddings"][0], [])
            capture = None
            if forward is not None and forward.layout is not None and len(plans) <= stage:
                capture = self._planner.capture(forward, stage)
            return args, {**kwargs, "epic_scoring": self._scoring[stage].call(capture)}

        return hook

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
        forward = self._forward
        if forward is not None and forward.decoding and cache is None:
            raise RuntimeError(
                f"decoding a compressed KV cache, but decoder layer {index} received no cache: its attention mask "
                "would not match the cache"
            )
        stage = self._stage_of_layer[index]
        rotary = kwargs["position_embeddings"][0]
        plans = self._plans.get(rotary)
        if plans is None or len(plans) <= stage:
            if forward is None:
                raise RuntimeError(
                    "a decoder layer ran under epic.compress outside a forward of the LLaVA model it is attached "
                    "to; call that model (not its inner language model)"
                )
            plans = self._new_plans(stage, index, forward, hidden_states, kwargs, cache)
            if plans is None:  # a forward without images (or decoding after one): nothing was compressed
                if cache is not None:
                    check_mask_fits_cache(kwargs.get("attention_mask"), cache, hidden_states.shape[1], index)
                return None
            self._plans[rotary] = plans
        plan = plans[stage]
        if plan.gather_index is not None and index == self._stage_layers[stage]:
            if plan.merged is not None:  # new embeddings of some kept tokens (VisionZip's contextual tokens)
                rows, positions, values = plan.merged
                hidden_states = hidden_states.index_put((rows, positions), values.to(hidden_states.dtype))
            index_into = plan.gather_index if plan.step_index is None else plan.step_index
            hidden_states = hidden_states.gather(1, index_into[..., None].expand(-1, -1, hidden_states.shape[-1]))
        if last_layer and self.trim_last_layer:
            self._mlp_rows = plan.logit_slots  # None without a boolean logits_to_keep, and when decoding
        kwargs = {**kwargs, "attention_mask": plan.masks[self._layer_types[index]]}
        if cache is not None:
            check_mask_fits_cache(kwargs["attention_mask"], cache, hidden_states.shape[1], index)
        if plan.position_embeddings is not None:  # a prefill (a decoding step's stock ones are right)
            kwargs["position_embeddings"] = plan.position_embeddings
            if plan.position_ids is not None:
                kwargs["position_ids"] = plan.position_ids
        return (hidden_states, *args), kwargs

    def _new_plans(
        self, stage: int, index: int, forward: ForwardState, hidden_states: torch.Tensor, kwargs: dict, cache: Any
    ) -> list[Plan] | None:
        """Every stage's plan so far once this forward reaches stage `stage`'s layer (a decoding step plans all of
        its stages at the first); None when it compresses nothing."""
        if forward.decoding:
            if stage > 0:  # the first stage made every stage's step plan, unless the prefill had no image
                return None
            return self._planner.decode_plans(self._cache_record, forward, hidden_states, kwargs, cache)
        if forward.layout is None:
            return None
        if index != self._stage_layers[stage] or len(forward.plans) != stage:
            raise RuntimeError(f"stage {stage} of the compression was not planned at layer {self._stage_layers[stage]}")
        if stage == 0 and self.record_prefix:
            vision = self._planner.vision_of(forward)
            without_cache = self.layout.without_cache(kwargs)
            record = None if vision is None else vision.detached()
            self.prefix = Prefix(hidden_states.detach(), without_cache, forward.layout, forward.scores, record)
        self._planner.plan_stage(stage, forward, hidden_states, kwargs, cache, scored=stage in self._scoring)
        return list(forward.plans)
