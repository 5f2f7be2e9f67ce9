"""What the commands share: reading a model folder, a path, a budget list and a compression, as one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

USAGE_ERROR = 2  # the exit status of a command refused for what it was given
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # `owner/name`: left to transformers (its cache, or the Hub when online)


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


def llava_folder(path: str) -> str:
    """`path` when it holds a LLaVA model (`config.json` with model_type 'llava'); else a one-line error."""
    folder = Path(path)
    if not folder.exists() and HUB_ID.fullmatch(path) and not path.startswith("."):
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(path).model_type
    elif not folder.is_dir():
        raise ValueError(
            f"{path}: no such model folder (give a folder saved by `epic train`, `epic demo` or save_pretrained)"
        )
    elif not (folder / "config.json").is_file():
        raise ValueError(f"{path} is not a model folder: it has no config.json (give the folder save_pretrained wrote)")
    else:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "llava":
        raise ValueError(f"{path} holds a {model_type!r} model, not a LLaVA model (model_type 'llava')")
    return path


def load_llava(path: str, template: str | None):
    """(model in eval mode, processor, template) of a LLaVA folder; the template stored with it unless named."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from epic.data.templates import get_template
    from epic.models.factory import saved_template

    model = LlavaForConditionalGeneration.from_pretrained(llava_folder(path)).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor, get_template(template or saved_template(Path(path)), processor.tokenizer)


def existing(path: str, option: str) -> Path:
    """`path` when it exists (a file, or a benchmark's folder); else a one-line error naming the option."""
    if not Path(path).exists():
        raise ValueError(f"{option} {path}: no such file")
    return Path(path)


def budget_list(text: str) -> list[int]:
    """`--tokens 64,16,7` as integers; a one-line error for anything else."""
    try:
        return [int(tokens) for tokens in text.split(",")]
    except ValueError:
        raise ValueError(f"--tokens takes whole numbers separated by commas (e.g. 64,16,7), got {text!r}") from None


def compression_of(method: str, tokens: int | None, ratio: float | None, layer: int, image_tokens: int):
    """The compression a command runs and its words for the header; `method` 'none' keeps every token, and without
    --tokens or --ratio a method keeps N/9 of the image's tokens."""
    from epic.compression import METHODS, Budget, default_tokens
    from epic.eval.runner import CompressionSettings

    if method == "none":
        if tokens is not None or ratio is not None:
            raise ValueError("--method none keeps every visual token: drop --tokens/--ratio, or choose a method")
        return None, f"no compression, all {image_tokens} visual tokens"
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}: choose one of {', '.join(sorted(METHODS))} or none")
    if tokens is None and ratio is None:
        tokens = default_tokens(image_tokens)
    kept = Budget(tokens, ratio).resolve(image_tokens)
    words = f"{method}, {kept} of {image_tokens} visual tokens per image kept from layer {layer}"
    return CompressionSettings(method, tokens=tokens, ratio=ratio, layer=layer), words
