"""Batched greedy generation over an evaluation file, optionally compressed, resumable from its predictions file.

Prompts are built with the conversation template the model was trained with (exactly the segments training saw
before a reply), left-padded into batches, and generated greedily. Every finished batch is appended to a JSONL
predictions file and flushed to disk, so an interrupted evaluation resumes where it stopped; the run's settings are
recorded beside it (`epic.eval.provenance`), so that a resume reuses only answers made with the same settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

import epic
from epic.data.dataset import image_token_count
from epic.data.encoding import encode_prompt
from epic.data.images import load_image, prepare_image
from epic.data.records import load_records
from epic.data.templates import Template, Turn, reply_stop_ids
from epic.eval.provenance import claim_predictions, run_settings


@dataclass
class EvalItem:
    """One question: the conversation up to the reply to predict, its images and the reference answer."""

    item_id: str
    turns: list[Turn]
    images: list[Path | Image.Image]
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CompressionSettings:
    method: str
    tokens: int | None = None
    ratio: float | None = None
    layer: int = 2
    seed: int = 0


def load_items(data_file: Path, image_folder: Path | None) -> list[EvalItem]:
    """Evaluation items from a LLaVA-format file: the last assistant turn is the reference answer."""
    items = []
    for record in load_records(Path(data_file), image_folder, on_error="strict"):
        if record.record_id is None or record.turns[-1].role != "assistant":
            raise ValueError(f"{data_file} {record.where}: an evaluation item needs an id and ends on its answer")
        *turns, reply = record.turns
        extra = {key: value for key, value in record.raw.items() if key not in ("id", "image", "conversations")}
        items.append(EvalItem(record.record_id, turns, record.images, reply.text, extra))
    if not items:
        raise ValueError(f"{data_file}: no evaluation item")
    ids = [item.item_id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{data_file}: item ids are not unique")
    return items


def read_predictions(path: Path) -> dict[str, str]:
    """Predictions already written (id -> text); a torn last line of an interrupted run is ignored."""
    predictions = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            predictions[row["id"]] = row["prediction"]
    return predictions


def _image(source: Path | Image.Image, image_mode: str, processor) -> Image.Image:
    """An item's image from its file, or as given (benchmarks that embed their images)."""
    if isinstance(source, Image.Image):
        return prepare_image(source, image_mode, processor.image_processor)
    return load_image(source, image_mode, processor.image_processor)


def _batches(items: list[EvalItem], size: int) -> Iterator[list[EvalItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt) :] = 1
    return input_ids, attention_mask


def generate_answers(
    model,
    processor,
    template: Template,
    items: list[EvalItem],
    predictions_path: Path,
    compression: CompressionSettings | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    image_mode: str = "pad",
    progress: bool = True,
    restart: bool = False,
) -> dict[str, str]:
    """Greedy answers for every item (id -> text), resuming from and appending to `predictions_path`.

    Answers already there are reused only when they were made with the same settings (model weights, template,
    compression, items, generation); otherwise `StaleResults` names what differs, unless `restart` discards them.
    """
    settings = run_settings(model, template.name, items, compression, max_new_tokens, image_mode)
    claim_predictions(predictions_path, settings, restart)
    predictions = read_predictions(predictions_path)
    todo = [item for item in items if item.item_id not in predictions]
    tokenizer = processor.tokenizer
    image_tokens = image_token_count(processor)
    device = next(model.parameters()).device
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    if predictions_path.is_file() and not predictions_path.read_bytes().endswith(b"\n"):
        with open(predictions_path, "a") as out:
            out.write("\n")  # close a line torn by an interruption; read_predictions skips it
    attached = (
        epic.compress(
            model,
            compression.method,
            tokens=compression.tokens,
            ratio=compression.ratio,
            layer=compression.layer,
            seed=compression.seed,
        )
        if compression is not None
        else nullcontext()
    )
    if progress and len(todo) < len(items):
        print(f"resuming {predictions_path}: {len(items) - len(todo)} of {len(items)} answers made with these settings")
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="eval", unit="q", disable=not progress)
    with attached, open(predictions_path, "a") as out, torch.inference_mode():
        for batch in _batches(todo, batch_size):
            prompts = [
                encode_prompt(item.turns, template, tokenizer, processor.image_token_id, image_tokens) for item in batch
            ]
            input_ids, attention_mask = _left_padded(prompts, tokenizer.pad_token_id)
            inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
            images = [_image(source, image_mode, processor) for item in batch for source in item.images]
            if images:
                pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
                inputs["pixel_values"] = pixels.to(device, next(model.parameters()).dtype)
            generated = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(reply_stop_ids(template, tokenizer)),
            )
            for item, tokens in zip(batch, generated[:, input_ids.shape[1] :], strict=True):
                text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                predictions[item.item_id] = text
                out.write(json.dumps({"id": item.item_id, "prediction": text}) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(batch))
    bar.close()
    return {item.item_id: predictions[item.item_id] for item in items}
