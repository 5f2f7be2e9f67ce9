"""How each stage of a compression plans a forward: it scores, selects, gathers and masks, in the coordinates of
the sequence the stage before left (the engine's hooks call it; it holds no per-forward state of its own, which
lives in `forward.ForwardState`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from epic.compat import Layout, last_query_and_keys
from epic.compression.attention import Capture
from epic.compression.batch import BatchLayout
from epic.compression.decoding import CacheRecord
from epic.compression.forward import ForwardState
from epic.compression.planning import (
    Plan,
    build_masks,
    gather_plan,
    next_stage_plan,
    score_last_query,
    score_prompt,
    select_kept,
    slot_layout,
)
from epic.compression.registry import CompressionMethod, method_features, scores_own_layer
from epic.compression.stages import Stage
from epic.compression.vision import VisionRecord, VisionTap


@dataclass
class StagePlanner:
    """One compression's stages on one model: what each stage needs to plan (its method, budgets and layers, the
    model's layout and attention types) and the seeded generator of methods that draw at random."""

    method: CompressionMethod
    stages: list[Stage]
    layout: Layout
    text_config: Any
    layer_types: list[str]
    language_model: nn.Module
    generator: torch.Generator
    vision: VisionTap | None
    timed: Callable[[], AbstractContextManager]
    cap_budgets: bool = False  # images differ in size: an exact budget keeps a smaller image whole

    @property
    def stage_layers(self) -> list[int]:
        return [stage.layer for stage in self.stages]

    def stage_layout(self, forward: ForwardState) -> BatchLayout:
        """The layout the next stage selects in: the input's, or the last planned stage's slot coordinates (made
        once per stage: its scoring and its selection both read it)."""
        if forward.plan is None:
            return forward.layout
        stage = len(forward.plans)
        if stage not in forward.layouts:
            forward.layouts[stage] = slot_layout(forward.layout, forward.plan)
        return forward.layouts[stage]

    def capture(self, forward: ForwardState, stage: int) -> Capture:
        """A capture scoring the prompt for stage `stage` (in the slot coordinates of the stage before). A checkpointed
        layer recomputed in backward may call it again once the stage is planned: it then does nothing."""

        def capture(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
            if len(forward.plans) != stage:
                return
            with torch.no_grad(), self.timed():
                layout = self.stage_layout(forward)
                forward.scores = score_prompt(query, key, module.scaling, layout.prompt_last, layout.attention_mask)

        return capture

    def vision_of(self, forward: ForwardState) -> VisionRecord | None:
        """What the vision tower saw of this forward's images (a method reading it), or None for any other."""
        if self.vision is None:
            return None
        record = forward.vision if forward.vision is not None else self.vision.take()
        if record is None:
            raise RuntimeError(
                f"{type(self.method).__name__} reads the vision tower, which did not run under this compression: pass "
                "pixel_values, or compute the image features after epic.compress"
            )
        forward.vision = record
        return record

    def decode_plans(
        self, record: CacheRecord, forward: ForwardState, hidden_states: torch.Tensor, kwargs: dict, cache: Any
    ) -> list[Plan] | None:
        """Every stage's plan of a decoding step over the compressed cache (None: the prefill had no image)."""
        query_length = hidden_states.shape[1]
        positions = kwargs.get("position_ids")
        plans = record.step_plans(forward.decode_mask, positions, query_length, cache, self.stage_layers)
        for stage, plan in enumerate(plans or []):
            self.build_masks(plan, stage, query_length, hidden_states, cache)
        return plans

    def plan_stage(
        self, stage: int, forward: ForwardState, hidden_states: torch.Tensor, kwargs: dict, cache: Any, scored: bool
    ) -> Plan:
        """Stage `stage`'s plan of a prefill reaching its layer with `hidden_states` ([B, L_s, d], what enters it),
        appended to `forward`'s plans and kept positions. `scored`: layer K_s - 1 scored this stage."""
        index = self.stage_layers[stage]
        previous = forward.plan
        layout = self.stage_layout(forward)
        if scores_own_layer(self.method):
            position_embeddings = kwargs["position_embeddings"] if previous is None else previous.position_embeddings
            self._score_own_layer(index, layout, forward, hidden_states, position_embeddings)
        elif scored and forward.scores is None:
            raise RuntimeError(f"layer {index - 1} was not scored before layer {index}")
        vision = self.vision_of(forward) if stage == 0 else None
        with self.timed():
            with torch.no_grad():
                features = method_features(self.method, hidden_states, self.language_model.norm)
            keep, kept, merged = select_kept(
                self.method,
                self.stages[stage].budget,
                layout,
                forward.scores,
                features,
                self.generator,
                hidden_states.device,
                None if vision is None else vision.images(layout, hidden_states),
                self.cap_budgets,
            )
        forward.scores = None  # consumed: a later stage scores again
        if previous is None:
            positions, rotary = kwargs.get("position_ids"), kwargs["position_embeddings"]
            plan = gather_plan(keep, layout.attention_mask, positions, rotary, forward.logits_mask)
            plan.merged = merged
        else:  # `kept` are slots of the previous stage's sequence: report them as input positions
            sources = previous.gather_index.cpu()
            kept = [[sources[row][slots] for slots in row_kept] for row, row_kept in enumerate(kept)]
            plan = next_stage_plan(previous, keep)
        self.build_masks(plan, stage, plan.gather_index.shape[1], hidden_states, cache)
        forward.plans.append(plan)
        forward.stage_kept.append(kept)
        return plan

    def build_masks(self, plan: Plan, stage: int, query_length: int, like: torch.Tensor, cache: Any) -> None:
        """The masks of stage `stage`'s layer group (from its layer to the next stage's) into `plan`."""
        following = self.stage_layers[stage + 1 : stage + 2]
        build_masks(
            plan,
            layout=self.layout,
            text_config=self.text_config,
            layer_types=self.layer_types,
            first_layer=self.stage_layers[stage],
            last_layer=following[0] if following else len(self.layer_types),
            query_length=query_length,
            cache=cache,
            like=like,
        )

    def _score_own_layer(
        self,
        index: int,
        layout: BatchLayout,
        forward: ForwardState,
        hidden_states: torch.Tensor,
        position_embeddings: tuple,
    ) -> None:
        """Scores from layer `index`'s own attention over what enters it (laid out as `layout`), before this stage
        drops anything: its keys at every position and its query at the last prompt token only."""
        layer = self.language_model.layers[index]
        with torch.no_grad(), self.timed():
            query_last, key = last_query_and_keys(layer, hidden_states, position_embeddings, layout.prompt_last)
            scaling = layer.self_attn.scaling
            forward.scores = score_last_query(query_last, key, scaling, layout.prompt_last, layout.attention_mask)
