"""epic: visual-token compression and consistency distillation for LLaVA-family models."""

from epic.compression import METHODS, Compression, compress

__version__ = "0.1.0"

__all__ = ["METHODS", "Compression", "__version__", "compress"]
