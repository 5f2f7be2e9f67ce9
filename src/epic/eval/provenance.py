"""What decides an evaluation's answers, recorded beside its predictions so a resumed run reuses only its own work.

A predictions file `P.jsonl` has a settings file `P.settings.json` written before its first answer: the model (its
name and a fingerprint of its weights), the conversation template, the compression, the evaluation items (a digest
of their ids, conversations, answers and images) and the generation settings. Resuming into a folder whose settings
differ is refused with the settings that differ named; `restart=True` discards the old answers instead. The batch
size is not recorded: it changes only the padding, not what greedy decoding answers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from epic.eval.runner import CompressionSettings, EvalItem

SAMPLED_VALUES = 4096  # values hashed per weight tensor: retraining changes them all, so a strided sample suffices


class StaleResults(ValueError):
    """A predictions file holds answers of another run (other model, compression, data or settings)."""


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A digest of every weight's name, shape, dtype and `SAMPLED_VALUES` evenly strided values (16 hex digits)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLED_VALUES)
        sample = flat[::step][:SAMPLED_VALUES].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _image_key(image: object) -> str:
    if isinstance(image, Path | str):
        path = Path(image)
        return f"{path}:{path.stat().st_size}" if path.is_file() else str(path)
    return hashlib.sha256(image.tobytes()).hexdigest()  # an embedded PIL image


def items_fingerprint(items: list[EvalItem]) -> str:
    """A digest of the items' ids, conversations, reference answers and images (paths and sizes, or pixels)."""
    digest = hashlib.sha256()
    for item in items:
        turns = [[turn.role, turn.text] for turn in item.turns]
        images = [_image_key(image) for image in item.images]
        digest.update(json.dumps([item.item_id, turns, item.answer, images]).encode())
    return digest.hexdigest()[:16]


def run_settings(
    model: torch.nn.Module,
    template_name: str,
    items: list[EvalItem],
    compression: CompressionSettings | None,
    max_new_tokens: int,
    image_mode: str,
) -> dict[str, Any]:
    """Everything that decides the answers of one evaluation run, as JSON-ready values."""
    return {
        "model": str(getattr(model, "name_or_path", "") or type(model).__name__),
        "weights": weights_fingerprint(model),
        "template": template_name,
        "compression": None if compression is None else asdict(compression),
        "items": f"{len(items)} items, {items_fingerprint(items)}",
        "max_new_tokens": max_new_tokens,
        "image_mode": image_mode,
    }


def settings_path(predictions_path: Path) -> Path:
    """`P.settings.json` beside `P.jsonl`."""
    return predictions_path.with_suffix(".settings.json")


def _differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = dict.fromkeys([*recorded, *current])
    return [
        f"{key} {recorded.get(key)!r} != {current.get(key)!r}" for key in keys if recorded.get(key) != current.get(key)
    ]


def claim_predictions(predictions_path: Path, settings: dict[str, Any], restart: bool = False) -> None:
    """Make `predictions_path` this run's: keep answers written under the same settings, refuse another run's
    (`StaleResults` naming what differs) unless `restart` discards them, and record the settings for the next resume."""
    record = settings_path(predictions_path)
    if restart:
        predictions_path.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
    has_answers = predictions_path.is_file() and predictions_path.stat().st_size > 0
    if has_answers and not record.is_file():
        raise StaleResults(
            f"{predictions_path} holds answers but no record of the settings they were made with ({record.name}); "
            "evaluate into another --out, or pass --restart to discard them"
        )
    if record.is_file():
        differences = _differences(json.loads(record.read_text()), settings)
        if differences and has_answers:
            raise StaleResults(
                f"{predictions_path} holds another run's answers ({'; '.join(differences)}); "
                "evaluate into another --out, or pass --restart to discard them"
            )
        if not differences:
            return
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_suffix(".json.partial")
    partial.write_text(json.dumps(settings, indent=1))
    os.replace(partial, record)


def recorded_settings(predictions_path: Path) -> dict[str, Any]:
    """The settings `predictions_path`'s answers were made with (for metrics files that say what they score)."""
    return json.loads(settings_path(predictions_path).read_text())
