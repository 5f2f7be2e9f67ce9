"""Visual-token compression for stock transformers LLaVA models.

`compress(model, method=..., tokens=..., layer=...)` attaches a registered method (see `METHODS`); adding a
method is one small file with a `@register_method("name")` dataclass.

The parts, in the order a forward meets them: `batch` reads the batch (images, prompt, padding), `planning`
scores, selects and builds the gather plan and masks (pure tensor functions), `engine` holds the hooks and their
life cycle, `suffix` re-runs the upper layers for a distillation teacher. Names are imported on first use, so
`import epic.compression.registry` (the CLI's method names) needs no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # public name -> the module that defines it
    "Budget": "budget",
    "Stage": "stages",
    "parse_stages": "stages",
    "default_tokens": "budget",
    "Compression": "engine",
    "compress": "api",
    "Prefix": "suffix",
    "run_suffix": "suffix",
    "CompressionMethod": "registry",
    "build_method": "registry",
    "method_names": "registry",
    "register_method": "registry",
    "ImageSelection": "selection",
}

__all__ = ["METHODS", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the registry with the built-in methods registered
        return importlib.import_module(f"{__name__}.registry").registered_methods()
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
