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
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from epic.compression.selection import ImageSelection
    from epic.compression.stages import Stage

BUILTIN_PACKAGE = "epic.compression.methods"


class CompressionMethod(Protocol):
    """Chooses which visual tokens of one image survive past the compression layer.

    Class attributes saying what the method reads (the engine computes nothing a method does not ask for):
        needs_features: the hidden states entering the compression layer, after the model's final norm;
        raw_features (optional, default False): with `needs_features`, those hidden states as they are (before the
            LLM: the projected visual features and the text embeddings);
        needs_scores (optional, default True): layer K-1's attention row and key norms; a method without them can
            also run before the LLM (`layer=0`).
        scores_at (optional, default "previous"): "own" scores with the compression layer's own attention over what
            enters it (its keys and one query row projected once more: PyramidDrop's ranking) instead of layer
            K-1's; it can then run at layer 0 too.
        needs_vision (optional, default False): what the vision tower saw of each image (`ImageSelection.vision`:
            its feature layer's attention and keys, the features entering the projector).
        before_llm_only (optional, default False): the method runs before the LLM only (`layer=0`).
    A method may also define `merge(image) -> (positions, embeddings)`: new embeddings for some of the tokens it
    keeps (VisionZip's contextual tokens), computed with gradients.
    A method may also define `schedule(stages, num_layers) -> list[Stage]`: the stages it prunes at when given
    one (PyramidDrop's pyramid); given several, they are used as they are.
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


def needs_scores(method: CompressionMethod) -> bool:
    """Whether `method` reads layer K-1's attention and key norms (so it runs inside the LLM only)."""
    return getattr(method, "needs_scores", True)


def scores_own_layer(method: CompressionMethod) -> bool:
    """Whether `method` scores with its compression layer's own attention (see `CompressionMethod.scores_at`)."""
    return getattr(method, "scores_at", "previous") == "own"


def scheduled_stages(method: CompressionMethod, stages: list[Stage], num_layers: int) -> list[Stage]:
    """The stages `method` prunes at: its own `schedule` from a single stage, else `stages` as given."""
    schedule = getattr(method, "schedule", None)
    return schedule(stages, num_layers) if schedule is not None and len(stages) == 1 else stages


def needs_vision(method: CompressionMethod) -> bool:
    """Whether `method` reads what the vision tower saw (`ImageSelection.vision`)."""
    return getattr(method, "needs_vision", False)


def before_llm_only(method: CompressionMethod) -> bool:
    """Whether `method` runs before the LLM only (`layer=0`)."""
    return getattr(method, "before_llm_only", False)


def check_stage(method: CompressionMethod, layer: int) -> None:
    """Refuse, in one line, a method that scores with layer K-1's attention asked to run before the LLM, or a
    before-the-LLM-only method asked to run inside it."""
    if layer > 0 and before_llm_only(method):
        name = next((name for name, cls in METHODS.items() if cls is type(method)), type(method).__name__)
        raise ValueError(
            f"compression method {name!r} runs before the LLM only: use layer=0 ({name}@0 in a method list), not "
            f"layer={layer}"
        )
    if layer == 0 and needs_scores(method) and not scores_own_layer(method):
        before = sorted(
            name for name, cls in registered_methods().items() if not needs_scores(cls) or scores_own_layer(cls)
        )
        raise ValueError(
            f"compression method {type(method).__name__} scores with layer K-1's attention, so it cannot run before "
            f"the LLM (layer=0); use layer >= 1, or a method that runs before the LLM: {before}"
        )


def method_features(method: CompressionMethod, hidden_states: torch.Tensor, norm: Callable) -> torch.Tensor | None:
    """What `method` reads as features of the hidden states entering the compression layer ([B, L, d] or None)."""
    if not method.needs_features:
        return None
    return hidden_states if getattr(method, "raw_features", False) else norm(hidden_states)


def builtin_method_names() -> list[str]:
    """The built-in methods' names: the modules of `epic.compression.methods`, found without importing them."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    return sorted(module.name for module in pkgutil.iter_modules(spec.submodule_search_locations))


def method_names() -> list[str]:
    """Every method name `build_method` accepts: the built-ins and any registered since (torch-free)."""
    return sorted({*builtin_method_names(), *METHODS})


def method_spec(spec: str, layer: int) -> tuple[str, int]:
    """(method name, layer) of a method list entry: `name` compresses at `layer`, `name@K` at layer K (`divprune@0`:
    before the LLM). Torch-free, so commands check their lists before loading a model."""
    name, at, where = spec.partition("@")
    if name not in method_names():
        raise ValueError(f"unknown compression method {name!r} in {spec!r}: choose from {', '.join(method_names())}")
    if not at:
        return name, layer
    if not where.isdigit():
        raise ValueError(f"{spec!r}: the layer after @ must be a non-negative integer, e.g. {name}@0 (before the LLM)")
    return name, int(where)


def method_stages(layer: int) -> list[str]:
    """Every registered method as a method list entry at `layer` and, where it needs no layer K-1 scores, also
    before the LLM (`name@0`); a before-the-LLM-only method as `name@0` alone."""
    entries = []
    for name, cls in sorted(registered_methods().items()):
        if before_llm_only(cls):
            entries.append(f"{name}@0" if layer != 0 else name)
        else:
            entries += [name] + ([f"{name}@0"] if not needs_scores(cls) and layer != 0 else [])
    return entries


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
