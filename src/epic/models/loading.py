"""One way to open a saved LLaVA folder: check it is one, then load the model, its processor and its template.

Used by the CLI, the chat, the web page, evaluation and the demo, so that a bad folder gets the same one-line error
everywhere and a checkpoint is always read with the conversation template it was trained with. Importing this
module needs no torch (the command line's parser imports it); loading does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # `owner/name`: left to transformers (its cache, or the Hub when online)
TOKENIZER_TEMPLATE = "tokenizer"  # epic.data.templates' name for the tokenizer's own chat template


class LoadedLlava(NamedTuple):
    model: Any  # LlavaForConditionalGeneration, in eval mode
    processor: Any  # its AutoProcessor
    template: Any  # epic.data.templates.Template


def llava_folder(path: str | Path) -> str:
    """`path` when it holds a LLaVA model (`config.json` with model_type 'llava'); else a one-line ValueError."""
    path = str(path)
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


def stored_template_name(folder: str | Path, fallback: str | None = None) -> str:
    """The template a folder was saved with (`epic.json`); `fallback` where there is none, else a one-line error."""
    from epic.models.factory import EPIC_FILE, saved_template

    if (Path(folder) / EPIC_FILE).is_file() or fallback is None:
        return saved_template(Path(folder))
    return fallback


def load_llava_model(path: str | Path, **model_options: Any) -> Any:
    """The LlavaForConditionalGeneration of a LLaVA folder, in eval mode; `model_options` go to `from_pretrained`
    (`dtype`, `attn_implementation`). For callers that need neither processor nor template (`epic bench`).

    Weights load from safetensors only: a folder with pickled weights (`pytorch_model.bin`) is refused, since
    unpickling runs code; convert it once with a trusted `save_pretrained`."""
    from transformers import LlavaForConditionalGeneration

    folder = llava_folder(path)
    if Path(folder).is_dir() and not any(Path(folder).glob("*.safetensors")):  # a hub id: use_safetensors refuses
        raise ValueError(
            f"{folder}: no *.safetensors weights; epic loads no pickled weights (re-save with save_pretrained)"
        )
    return LlavaForConditionalGeneration.from_pretrained(folder, use_safetensors=True, **model_options).eval()


def load_llava(
    path: str | Path, template: str | None = None, fallback_template: str | None = None, **model_options: Any
) -> LoadedLlava:
    """(model in eval mode, processor, template) of a LLaVA folder. The template is `template` if named, else the
    one stored with the checkpoint, else `fallback_template` (e.g. TOKENIZER_TEMPLATE) if given; it is resolved
    before the weights load, so a bad one fails fast. `model_options` go to `from_pretrained`."""
    from transformers import AutoProcessor

    from epic.data.templates import get_template

    folder = llava_folder(path)
    name = template or stored_template_name(folder, fallback_template)
    processor = AutoProcessor.from_pretrained(folder)
    try:
        chosen = get_template(name, processor.tokenizer)
    except ValueError as error:
        raise ValueError(f"{folder}: {error}; name a conversation template (--template)") from None
    return LoadedLlava(load_llava_model(folder, **model_options), processor, chosen)
