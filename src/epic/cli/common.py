"""What the commands share: reading a model folder, a path, a budget list and a compression, as one-line errors."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path

USAGE_ERROR = 2  # the exit status of a command refused for what it was given


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in every option's help, except where the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default:" in help_text or action.default in (None, False, "", argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)


def default_threads() -> int:
    """--threads' default: $OMP_NUM_THREADS, else 1."""
    return int(os.environ.get("OMP_NUM_THREADS", "1"))


def existing(path: str, option: str) -> Path:
    """`path` when it exists (a file, or a benchmark's folder); else a one-line error naming the option."""
    if not Path(path).exists():
        raise ValueError(f"{option} {path}: no such file")
    return Path(path)


def one_of(value: str, names: Iterable[str], option: str) -> str:
    """`value` when it is one of `names` (a registry's, read when the command runs: listing it at parse time would
    import torch into `--help`); else a one-line error listing them."""
    names = list(names)
    if value not in names:
        raise ValueError(f"{option} {value!r} is not one of {', '.join(names)}")
    return value


def budget_list(text: str) -> list[int]:
    """`--tokens 64,16,7` as integers; a one-line error for anything else."""
    try:
        return [int(tokens) for tokens in text.split(",")]
    except ValueError:
        raise ValueError(f"--tokens takes whole numbers separated by commas (e.g. 64,16,7), got {text!r}") from None


def method_list(text: str, layer: int) -> list[str]:
    """A comma-separated method list, each `name` or `name@K` (compress at K; `divprune@0`: before the LLM), checked
    against the registry before any model loads (a method that cannot run at its layer fails when it is attached)."""
    from epic.compression.registry import method_spec

    methods = [method.strip() for method in text.split(",") if method.strip()]
    for method in methods:
        method_spec(method, layer)
    return methods


def layer_words(methods: list[str], layer: int) -> str:
    """'layer K' for a header, noting the entries of `methods` that carry their own `@K`."""
    own = [method for method in methods if "@" in method]
    return f"layer {layer}" + (f" ({', '.join(own)} at their own)" if own else "")


def compression_of(method: str, tokens: int | None, ratio: float | None, layer: int, image_tokens: int):
    """The compression a command runs and its words for the header; `method` 'none' keeps every token, and without
    --tokens or --ratio a method keeps N/9 of the image's tokens."""
    from epic.compression import Budget, default_tokens
    from epic.compression.registry import method_names
    from epic.eval.runner import CompressionSettings

    if method == "none":
        if tokens is not None or ratio is not None:
            raise ValueError("--method none keeps every visual token: drop --tokens/--ratio, or choose a method")
        return None, f"no compression, all {image_tokens} visual tokens"
    if method not in method_names():
        raise ValueError(f"unknown compression method {method!r}: choose one of {', '.join(method_names())} or none")
    if tokens is None and ratio is None:
        tokens = default_tokens(image_tokens)
    kept = Budget(tokens, ratio).resolve(image_tokens)
    words = f"{method}, {kept} of {image_tokens} visual tokens per image kept from layer {layer}"
    return CompressionSettings(method, tokens=tokens, ratio=ratio, layer=layer), words
