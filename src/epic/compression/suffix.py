"""The teacher's suffix: the decoder layers from K run again on what entered them, under another compression or none.

A distillation teacher that compresses at or after the student's layer K shares the student's layers below K, so
only the layers from K on are run again (`Compression(record_prefix=True)` keeps what entered layer K).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from epic.compat import check_no_cache, language_model_of
from epic.compression.batch import BatchLayout
from epic.compression.planning import Scores
from epic.compression.trimming import last_mlp_of, mlp_at_rows

if TYPE_CHECKING:
    from epic.compression.engine import Compression
    from epic.compression.vision import VisionRecord


@dataclass(frozen=True)
class Prefix:
    """What entered the compression layer in the last forward with images (see `compress(record_prefix=True)`)."""

    hidden_states: torch.Tensor  # [B, L, d], detached, before any token was dropped
    layer_kwargs: dict[str, Any]  # that layer's other inputs: mask, position ids, rotary (cos, sin); no cache
    layout: BatchLayout  # where the images, prompt and padding are
    scores: Scores  # layer K-1's scores, reused by a teacher compressing at the same layer
    vision: VisionRecord | None = None  # what the vision tower saw (for a teacher method that reads it)


def run_layers(
    model: nn.Module, prefix: Prefix, start: int, wanted_rows: Callable[[], torch.Tensor], trim_last_mlp: bool
) -> torch.Tensor:
    """Final hidden states [N, d] (after the model's norm) at `wanted_rows()` ([B, L'] bool, read after the layers
    ran) of decoder layers `start`.. run on `prefix`; with `trim_last_mlp`, the last layer's MLP runs at those rows
    only. Project them with the LM head once any compression has finished its forward (its LM-head hook would
    otherwise select rows again)."""
    check_no_cache(prefix.layer_kwargs, "the teacher's suffix")  # recorded without the student's cache
    language_model = language_model_of(model)
    last_mlp = last_mlp_of(language_model)
    handles = mlp_at_rows(last_mlp, wanted_rows) if trim_last_mlp and last_mlp is not None else []
    hidden_states = prefix.hidden_states
    try:
        for layer in language_model.layers[start:]:
            hidden_states = layer(hidden_states, **prefix.layer_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return language_model.norm(hidden_states[wanted_rows()])


def run_suffix(
    model: nn.Module, prefix: Prefix, start: int, logits_mask: torch.Tensor, compression: Compression | None = None
) -> torch.Tensor:
    """Logits [N, V] at the `logits_mask` positions (original coordinates, [B, L] bool) of a forward resumed at
    decoder layer `start` from `prefix` (recorded entering that layer), under `compression` or none.

    The layers below `start` are not run again. The last layer's MLP runs at the `logits_mask` positions only (see
    `compress(trim_last_layer=True)`). `compression` must be attached to `model` and compress at a layer >= `start`
    (see `Compression.run_suffix`); pause any other compression attached to the same model meanwhile.
    """
    if compression is not None:
        return compression.run_suffix(prefix, start, logits_mask)
    logits_mask = logits_mask.to(prefix.hidden_states.device)
    rows = run_layers(model, prefix, start, lambda: logits_mask, trim_last_mlp=True)
    return model.get_output_embeddings()(rows)
