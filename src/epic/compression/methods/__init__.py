"""Built-in compression methods; importing this package registers them."""

from epic.compression.methods import dart, fastv, random

__all__ = ["dart", "fastv", "random"]
