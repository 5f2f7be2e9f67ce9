"""The method registry: `@register_method("name")` on a small dataclass with a `select` method.

The built-in methods are the modules of `epic.compression.methods`, one file per method named after it; their
names are listed without importing them (`method_names()` needs no torch, so `epic --help` stays fast), and
they register themselves the first time a method is built or `METHODS` is read through `registered_methods()`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from epic.compression.selection import ImageSelection

BUILTIN_PACKAGE = "epic.compression.methods"


class CompressionMethod(Protocol):
    """Chooses which visual tokens of one image survive past the compression layer.

    `needs_features` asks the engine for the normed hidden states entering the compression layer
    (only DART uses them; the others skip that work).
    """

    needs_features: bool

    def select(self, image: ImageSelection) -> torch.Tensor:
        """Return the kept input positions (LongTensor, exactly `image.budget` of `image.positions`)."""
        ...


METHODS: dict[str, type] = {}  # name -> method class, filled by `register_method`


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


def builtin_method_names() -> list[str]:
    """The built-in methods' names: the modules of `epic.compression.methods`, found without importing them."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    return sorted(module.name for module in pkgutil.iter_modules(spec.submodule_search_locations))


def method_names() -> list[str]:
    """Every method name `build_method` accepts: the built-ins and any registered since (torch-free)."""
    return sorted({*builtin_method_names(), *METHODS})


def registered_methods() -> dict[str, type]:
    """`METHODS` with the built-ins imported (and so registered)."""
    importlib.import_module(BUILTIN_PACKAGE)
    return METHODS


def build_method(name: str, **options) -> CompressionMethod:
    """Instantiate the registered method `name` with its keyword options; unknown names or options fail loudly."""
    methods = registered_methods()
    if name not in methods:
        raise ValueError(f"unknown compression method {name!r}; registered methods: {sorted(methods)}")
    cls = methods[name]
    known = {field.name for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"compression method {name!r} has no option(s) {unknown}; its options are {sorted(known)}")
    return cls(**options)


def resolve_method(method: str | CompressionMethod, options: dict | None = None) -> CompressionMethod:
    """A method instance: built from its registered name and `options`, or `method` itself (then without options)."""
    if isinstance(method, str):
        return build_method(method, **(options or {}))
    if options:
        raise ValueError(f"method options {sorted(options)} only apply when the method is given by name")
    return method
