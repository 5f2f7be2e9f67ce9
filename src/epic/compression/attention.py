"""A registered attention function through which the engine reads the queries and keys of layer K-1.

Only layer K-1's attention module is routed here (through a private copy of its config); the function
hands the post-RoPE queries and keys to a capture callback and then runs the model's own attention
implementation (eager, sdpa or flash) unchanged, so no L x L attention map is ever built for scoring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedConfig

from epic.compat import (
    attention_function,
    attention_implementation,
    eager_attention_of,
    register_attention,
    with_attention_implementation,
)

SCORING_ATTENTION = "epic_scoring"

Capture = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]


@dataclass
class ScoringCall:
    """Passed to layer K-1 as the keyword `epic_scoring`.

    Attributes:
        config: the model's own text config (names the real attention implementation).
        eager: the model family's eager attention function (used when that implementation is "eager").
        capture: called with (module, query [B, H, L, hd], key [B, kv_heads, L, hd]) or None to skip.
    """

    config: PreTrainedConfig
    eager: Callable
    capture: Capture | None


def scoring_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    epic_scoring: ScoringCall | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Capture (query, key), then run the model's real attention implementation with its real config.

    Without an `epic_scoring` call (its compression is paused) it just runs the real implementation.
    """
    if epic_scoring is None:
        epic_scoring = module.config._epic_passthrough
    if epic_scoring.capture is not None:
        epic_scoring.capture(module, query, key)
    attention = attention_function(attention_implementation(epic_scoring.config), epic_scoring.eager)
    routed_config = module.config
    module.config = epic_scoring.config  # flash attention reads the implementation name from the module
    try:
        return attention(module, query, key, value, attention_mask, **kwargs)
    finally:
        module.config = routed_config


def ensure_registered() -> None:
    """Register `scoring_attention` with transformers once (a stateless function; idempotent)."""
    register_attention(SCORING_ATTENTION, scoring_attention)


def routed_config(config: PreTrainedConfig, eager: Callable) -> PreTrainedConfig:
    """A shallow copy of `config` whose attention implementation is `scoring_attention`; it remembers how to run
    the real implementation when no capture is asked for."""
    routed = with_attention_implementation(config, SCORING_ATTENTION)
    routed._epic_passthrough = ScoringCall(config, eager, None)
    return routed


class ScoringRoute:
    """Layer K-1's attention module routed through `scoring_attention` while a compression is attached.

    The module gets a private copy of its config naming `scoring_attention`; `restore()` puts back what it had
    (another compression may have routed it first, so the real config is read through that route).
    """

    def __init__(self, module: nn.Module) -> None:
        ensure_registered()
        self.module = module
        self.config_before = module.config
        passthrough = getattr(module.config, "_epic_passthrough", None)
        self.config = passthrough.config if passthrough is not None else module.config
        self.eager = eager_attention_of(module)
        module.config = routed_config(self.config, self.eager)

    def call(self, capture: Capture | None) -> ScoringCall:
        """The `epic_scoring` keyword for one forward of the layer: capture its (query, key), or None to skip."""
        return ScoringCall(self.config, self.eager, capture)

    def restore(self) -> None:
        self.module.config = self.config_before
