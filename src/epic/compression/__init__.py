"""Visual-token compression for stock transformers LLaVA models.

`compress(model, method=..., tokens=..., layer=...)` attaches a registered method (see `METHODS`); adding a
method is one small file with a `@register_method("name")` dataclass.
"""

from epic.compression import methods
from epic.compression.engine import Budget, Compression, Prefix, compress, default_tokens, run_suffix
from epic.compression.registry import METHODS, CompressionMethod, build_method, register_method
from epic.compression.selection import ImageSelection

__all__ = [
    "METHODS",
    "Budget",
    "Compression",
    "CompressionMethod",
    "ImageSelection",
    "Prefix",
    "build_method",
    "compress",
    "default_tokens",
    "methods",
    "register_method",
    "run_suffix",
]
