"""epic: visual-token compression and consistency distillation for LLaVA-family models.

`epic.compress`, `epic.Compression` and `epic.METHODS` are read from `epic.compression` on first use, so importing
`epic` (the command line's `--help`) does not import torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["METHODS", "Compression", "__version__", "compress"]


def __getattr__(name: str) -> Any:
    if name in ("METHODS", "Compression", "compress"):
        import epic.compression

        return getattr(epic.compression, name)
    raise AttributeError(f"module 'epic' has no attribute {name!r}")
