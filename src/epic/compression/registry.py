"""The method registry: `@register_method("name")` on a small dataclass with a `select` method."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from epic.compression.selection import ImageSelection


class CompressionMethod(Protocol):
    """Chooses which visual tokens of one image survive past the compression layer.

    `needs_features` asks the engine for the normed hidden states entering the compression layer
    (only DART uses them; the others skip that work).
    """

    needs_features: bool

    def select(self, image: ImageSelection) -> torch.Tensor:
        """Return the kept input positions (LongTensor, exactly `image.budget` of `image.positions`)."""
        ...


METHODS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator adding a compression method under `name` (a dataclass whose fields are its options)."""

    def decorate(cls: type) -> type:
        if name in METHODS:
            raise ValueError(f"compression method {name!r} is already registered ({METHODS[name].__name__})")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"compression method {name!r} must be a dataclass; {cls.__name__} is not")
        METHODS[name] = cls
        return cls

    return decorate


def build_method(name: str, **options) -> CompressionMethod:
    """Instantiate the registered method `name` with its keyword options; unknown names or options fail loudly."""
    if name not in METHODS:
        raise ValueError(f"unknown compression method {name!r}; registered methods: {sorted(METHODS)}")
    cls = METHODS[name]
    known = {field.name for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"compression method {name!r} has no option(s) {unknown}; its options are {sorted(known)}")
    return cls(**options)
