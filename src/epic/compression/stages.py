"""Where and how much a compression prunes: one stage, or several at increasing layers (torch-free: the CLI reads it).

A stage (K, budget) makes decoder layers from K on see only the visual tokens it keeps; a later stage selects from
what the earlier one kept (PyramidDrop's pyramid, the released EPIC script's second pruned layer). Budgets count
tokens of the original image (`ratio` is a fraction of the original N), so they must not grow from stage to stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from epic.compression.budget import Budget


@dataclass(frozen=True)
class Stage:
    """Decoder layers from `layer` on see `budget` visual tokens per image (0: before the LLM)."""

    layer: int
    budget: Budget


def stage_of(layer: int, amount: int | float) -> Stage:
    """A stage from a layer and an amount: an int keeps that many tokens, a float in [0, 1) is a dropped ratio."""
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise ValueError(f"a stage's budget must be a token count (int) or a dropped ratio (float); got {amount!r}")
    return Stage(layer, Budget(tokens=amount) if isinstance(amount, int) else Budget(ratio=float(amount)))


def parse_stages(text: str) -> list[Stage]:
    """Stages from `"2:192,15:64"` (layer:tokens) or `"2:0.667,15:0.889"` (layer:dropped ratio)."""
    stages = []
    for item in text.split(","):
        layer, colon, amount = item.strip().partition(":")
        if not colon or not layer.isdigit():
            raise ValueError(f"stage {item!r} in {text!r}: write layer:tokens or layer:ratio, e.g. 2:192,15:64")
        try:
            value: int | float = int(amount) if amount.isdigit() else float(amount)
        except ValueError:
            raise ValueError(f"stage {item!r} in {text!r}: {amount!r} is neither a token count nor a ratio") from None
        stages.append(stage_of(int(layer), value))
    return stages


def check_stages(stages: Sequence[Stage], num_layers: int) -> list[Stage]:
    """`stages` as a list, refused in one line unless layers increase strictly inside [0, num_layers)."""
    stages = list(stages)
    if not stages:
        raise ValueError("give at least one compression stage")
    layers = [stage.layer for stage in stages]
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(
                f"compression layer must be an integer in [0, {num_layers - 1}] (0: before the LLM) for a model "
                f"with {num_layers} decoder layers; got {layer!r}"
            )
    if any(later <= earlier for earlier, later in pairwise(layers)):
        raise ValueError(f"compression stages must be at strictly increasing layers; got layers {layers}")
    return stages


def stage_budgets(stages: Sequence[Stage], image_tokens: int, cap: bool = False) -> list[int]:
    """Each stage's kept tokens for an image of `image_tokens` (`cap`: an exact budget above it keeps it whole),
    refused in one line where a stage would keep more than the one before it (a later stage selects from what
    the earlier kept)."""
    kept = [stage.budget.resolve(image_tokens, cap=cap) for stage in stages]
    if any(later > earlier for earlier, later in pairwise(kept)):
        described = ", ".join(f"layer {stage.layer}: {tokens}" for stage, tokens in zip(stages, kept, strict=True))
        raise ValueError(f"compression stages must not keep more tokens than the stage before ({described})")
    return kept


def parse_later_stages(text: str) -> list[tuple[int, float]]:
    """Later stages relative to a first one, from `"15:0.5,24:0.5"`: at each layer, drop that fraction of what the
    stage before kept (a training schedule sets the first stage's ratio; these follow it). `""` is none."""
    later = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        layer, colon, amount = item.partition(":")
        try:
            fraction = float(amount)
        except ValueError:
            fraction = -1.0
        if not colon or not layer.isdigit() or not 0.0 <= fraction < 1.0:
            raise ValueError(
                f"later stage {item!r} in {text!r}: write layer:fraction, the fraction in [0, 1) of what the stage "
                "before kept that this stage drops, e.g. 15:0.5"
            )
        later.append((int(layer), fraction))
    return later


def staged(layer: int, ratio: float, later: Sequence[tuple[int, float]]) -> list[Stage]:
    """The stages of a first stage (`layer`, dropped `ratio` of the image) followed by `later` ones, each dropping
    its fraction of what the one before kept: kept fraction (1 - ratio) * (1 - f_1) * ... at each."""
    stages, kept = [Stage(layer, Budget(ratio=ratio))], 1.0 - ratio
    for later_layer, fraction in later:
        kept *= 1.0 - fraction
        stages.append(Stage(later_layer, Budget(ratio=1.0 - kept)))
    return stages
