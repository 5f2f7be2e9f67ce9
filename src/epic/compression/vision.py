"""The vision tower's side of the methods that read it (VisionZip): what the tower's feature layer attends to,
its keys, and the features entering the projector, recorded each time the model computes its image features.

The record is taken by the compression layer of the forward it belongs to and checked against that forward's
image embeddings, so a record can never serve another batch's images.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from epic.compat import VisionScoring
from epic.compression.batch import BatchLayout


@dataclass
class VisionImage:
    """What the vision tower saw of one image, over its n visual tokens in order.

    positions: [n] input positions of the image's tokens; attention: [n] fp32 attention each received from the
    tower's [CLS] query (the mean query without a [CLS]), summed over heads; keys: [n, hd] the feature layer's keys
    averaged over heads; features: [n, d_v] what enters the projector; project: [m, d_v] -> [m, d] LLM embeddings.
    """

    positions: torch.Tensor
    attention: torch.Tensor
    keys: torch.Tensor
    features: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class VisionRecord:
    """One computation of the image features: per image (in the order the model places them), its tokens'
    attention [N, n], keys [N, n, hd], features [N, n, d_v] and their projection [N, n, d]."""

    attention: torch.Tensor
    keys: torch.Tensor
    features: torch.Tensor
    projected: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor]

    def detached(self) -> VisionRecord:
        return VisionRecord(self.attention, self.keys, self.features.detach(), self.projected.detach(), self.project)

    def images(self, layout: BatchLayout, hidden_states: torch.Tensor) -> list[list[VisionImage]]:
        """Per row, per image: its `VisionImage`. Refuses a record whose projected features are not the image
        embeddings entering the LLM ([B, L, d] `hidden_states`): another batch's, or none at all."""
        image_mask = layout.image_mask.to(hidden_states.device)
        projected = self.projected.reshape(-1, self.projected.shape[-1]).to(hidden_states.dtype)
        if projected.shape[0] != int(image_mask.sum()) or not torch.equal(hidden_states[image_mask], projected):
            raise RuntimeError(
                "the vision tower's record does not match this forward's image embeddings: a method reading the "
                "vision tower needs the image features computed under this compression (pass pixel_values, or call "
                "get_image_features after epic.compress)"
            )
        flat = iter(range(self.attention.shape[0]))
        return [
            [
                VisionImage(positions, self.attention[index], self.keys[index], self.features[index], self.project)
                for positions, index in zip(images, flat, strict=False)
            ]
            for images in layout.images
        ]


class VisionTap:
    """Hooks on the vision tower's feature layer and on the projector: each computation of the image features
    leaves one `VisionRecord`, which `take()` hands over (once). Nothing is recorded while `paused()`; the scoring
    runs inside `timed()` (the handle's scoring clock)."""

    def __init__(
        self, model: nn.Module, paused: Callable[[], bool], timed: Callable[[], AbstractContextManager]
    ) -> None:
        self.scoring = VisionScoring.of(model)
        self._is_paused = paused
        self._timed = timed
        self._scored: tuple[torch.Tensor, torch.Tensor] | None = None
        self._latest: VisionRecord | None = None
        self._projecting = False
        self._handles: list[RemovableHandle] = [
            self.scoring.layer.register_forward_pre_hook(self._score, with_kwargs=True),
            self.scoring.projector.register_forward_hook(self._record, with_kwargs=True),
        ]

    def take(self) -> VisionRecord | None:
        record, self._latest = self._latest, None
        return record

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The model's projector on `features` ([m, d_v] -> [m, d]), leaving no record."""
        self._projecting = True
        try:
            return self.scoring.projector(features)
        finally:
            self._projecting = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._scored = self._latest = None

    def _score(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._is_paused():
            return
        hidden_states = args[0] if args else kwargs["hidden_states"]  # [N, T, d_v]
        with torch.no_grad(), self._timed():
            attention, keys = self.scoring.attention_and_keys(hidden_states)
        if self.scoring.drops_first:  # the features drop the tower's first token ([CLS] for CLIP)
            attention, keys = attention[:, 1:], keys[:, 1:]
        self._scored = attention, keys

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        if self._is_paused() or self._projecting or self._scored is None:
            return
        features = args[0] if args else next(iter(kwargs.values()))
        attention, keys = self._scored
        self._scored = None
        self._latest = VisionRecord(attention, keys, features, output, self.project)
