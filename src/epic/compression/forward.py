"""What the hooks learn and decide during one forward of the model (or one `run_suffix`), and what it gives back:
the kept positions to publish and the loss over the kept sequence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from epic.compression.batch import BatchLayout
from epic.compression.planning import Plan, Scores
from epic.compression.vision import VisionRecord
from epic.labels import IGNORE_INDEX


@dataclass
class ForwardState:
    """What the hooks learn and decide during one forward of the model (or one `run_suffix`)."""

    layout: BatchLayout | None = None  # None: a forward without images, or a decoding step
    labels: torch.Tensor | None = None  # [B, L], held back from the model
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    logits_mask: torch.Tensor | None = None  # [B, L] bool: positions whose logits are wanted (original coordinates)
    decode_mask: torch.Tensor | None = None  # [B, kv + q] the 2D mask of a decoding step; None unless decoding
    scores: Scores | None = None  # for the stage about to plan (from layer K-1, or its own layer's attention)
    stage_kept: list[list[list[torch.Tensor]]] = field(default_factory=list)  # per stage, row, image: kept positions
    plans: list[Plan] = field(default_factory=list)  # per stage planned so far
    layouts: dict[int, BatchLayout] = field(default_factory=dict)  # stage -> where it selects (slot coordinates)
    vision: VisionRecord | None = None  # what the vision tower saw (a teacher's suffix: the student's record)

    @property
    def decoding(self) -> bool:
        return self.decode_mask is not None

    @property
    def plan(self) -> Plan | None:
        """The last stage's plan so far (the one the LM head and the loss read), or None before the first."""
        return self.plans[-1] if self.plans else None

    @property
    def kept(self) -> list[list[torch.Tensor]]:
        """Per row, per image: the input positions the last stage so far kept."""
        return self.stage_kept[-1] if self.stage_kept else []

    def published(self) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """(original_positions [B, L'] with -1 at filler, per stage the kept positions per row, sorted) of a
        planned forward."""
        plan = self.plan
        original_positions = torch.where(plan.valid, plan.gather_index, -1)
        kept = [
            [torch.cat(row).sort().values if row else torch.empty(0, dtype=torch.long) for row in stage]
            for stage in self.stage_kept
        ]
        return original_positions, kept

    def with_loss(self, model: nn.Module, output: Any, vocab_size: int) -> Any:
        """`output` with `loss`: the model's own loss function over the labels gathered like the hidden states
        (dropped positions are visual tokens, never supervised; filler is ignored)."""
        plan = self.plan
        labels = torch.where(plan.valid, self.labels.gather(1, plan.gather_index), IGNORE_INDEX)
        logits = output[0] if isinstance(output, tuple) else output.logits
        loss = model.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **self.loss_kwargs)
        if isinstance(output, tuple):
            return (loss, *output)
        return type(output)(loss=loss, **{key: value for key, value in output.items() if key != "loss"})
