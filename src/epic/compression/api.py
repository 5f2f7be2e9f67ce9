"""`compress`, the entry point: attach a method to a model with a budget, returning the `Compression` handle."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from epic.compression.budget import Budget
from epic.compression.engine import Compression
from epic.compression.registry import CompressionMethod, before_llm_only, resolve_method
from epic.compression.stages import Stage, parse_stages

DEFAULT_LAYER = 2  # the paper's K (the released EPIC training script's PRUNED_LAYER)


def compress(
    model: nn.Module,
    method: str | CompressionMethod = "dart",
    *,
    tokens: int | None = None,
    ratio: float | None = None,
    layer: int | None = None,
    stages: Sequence[Stage] | str | None = None,
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
        layer: K, the first decoder layer that sees the compressed sequence (0 <= K < num_layers; 0: before the LLM,
            for methods that need no layer K-1 attention); default 2, or 0 for a method that runs before the LLM
            only (VisionZip).
        stages: instead of `layer` and one budget, several pruning stages at increasing layers, each selecting from
            what the one before kept: `[Stage(2, Budget(tokens=192)), Stage(15, Budget(tokens=64))]` or
            `"2:192,15:64"` (layer:tokens, or layer:dropped ratio as `"2:0.667,15:0.889"`).
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
    method = resolve_method(method, options)
    if stages is not None:
        if layer is not None or tokens is not None or ratio is not None:
            raise ValueError("give either stages= or layer= with tokens=/ratio=, not both")
        stages = parse_stages(stages) if isinstance(stages, str) else list(stages)
    else:
        if layer is None:
            layer = 0 if before_llm_only(method) else DEFAULT_LAYER
        stages = [Stage(layer, Budget(tokens=tokens, ratio=ratio))]
    return Compression(
        model,
        method,
        stages=stages,
        seed=seed,
        profile=profile,
        record_prefix=record_prefix,
        trim_last_layer=trim_last_layer,
    )
