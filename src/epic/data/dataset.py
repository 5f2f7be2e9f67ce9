"""A lazy LLaVA-format dataset: rows are checked up front, tokenized and their images loaded on access."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from epic.data.encoding import Encoded, TooLong, encode_conversation
from epic.data.images import load_image
from epic.data.records import DataError, Problem, Record, load_records
from epic.data.templates import Template
from epic.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)


def image_token_count(processor) -> int:
    """Visual tokens per image for a `LlavaProcessor` (what `<image>` expands to), counted as the processor does:
    from the size of a processed image (crop or resize), plus CLS-like tokens, minus one for "default"."""
    pixels = processor.image_processor(Image.new("RGB", (32, 32)), return_tensors="pt")["pixel_values"]
    height, width = pixels.shape[-2:]
    tokens = (height // processor.patch_size) * (width // processor.patch_size)
    tokens += processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        tokens -= 1
    return tokens


def encode_record(
    record: Record, template: Template, processor, image_tokens: int, max_length: int | None
) -> Encoded | Problem:
    """A record's training ids and labels, or the `Problem` that stops it (over-long, or the template refuses it)."""
    try:
        return encode_conversation(
            record.turns, template, processor.tokenizer, processor.image_token_id, image_tokens, max_length
        )
    except TooLong as error:
        return Problem(record.where, record.record_id, "over-long row", str(error))
    except ValueError as error:
        return Problem(record.where, record.record_id, "template error", str(error))


@dataclass
class Example:
    """One encoded row: `input_ids`/`labels` [L], `pixel_values` [images, 3, H, W] or None for text-only rows."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    record_id: str | None


class LlavaDataset(Dataset):
    """LLaVA-format instruction data for a LLaVA processor and a conversation template.

    Rows that fail the checks of `epic.data.records`, or that cannot be cut to `max_length` without cutting an
    image, raise in `strict` mode (every problem listed) or are dropped, counted and logged in `skip` mode. The
    length check tokenizes every row once at construction (text only, no image is opened).
    """

    def __init__(
        self,
        data_file: Path,
        image_folder: Path | None,
        processor,
        template: Template,
        max_length: int | None = 2048,
        image_mode: str = "pad",
        on_error: str = "strict",
        verify_images: bool = True,
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.max_length = max_length
        self.image_mode = image_mode
        self.image_token_id = processor.image_token_id
        self.image_tokens = image_token_count(processor)
        records = load_records(Path(data_file), image_folder, on_error, verify_images)
        self.records: list[Record] = []
        self.lengths: list[int] = []  # positive for rows with images, negative for text-only (sampler convention)
        too_long: list[Problem] = []
        for record in records:
            encoded = encode_record(record, template, processor, self.image_tokens, max_length)
            if isinstance(encoded, Problem):
                too_long.append(encoded)
                continue
            self.records.append(record)
            length = len(encoded.input_ids)
            self.lengths.append(length if record.images else -length)
        self.skipped = too_long
        if too_long:
            if on_error == "strict":
                raise DataError(Path(data_file), too_long)
            logger.warning(
                "%s: skipped %d row(s) that do not fit max_length=%s or the template",
                data_file,
                len(too_long),
                max_length,
            )

    def _encode(self, record: Record) -> Encoded:
        return encode_conversation(
            record.turns, self.template, self.tokenizer, self.image_token_id, self.image_tokens, self.max_length
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        record = self.records[index]
        encoded = self._encode(record)
        pixel_values = None
        if record.images:
            images = [load_image(path, self.image_mode, self.processor.image_processor) for path in record.images]
            pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return Example(torch.tensor(encoded.input_ids), torch.tensor(encoded.labels), pixel_values, record.record_id)


def collate(examples: list[Example], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of examples into a batch; images of all rows are stacked in row order (the engine's layout)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    length = max(example.input_ids.numel() for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        size = example.input_ids.numel()
        span = slice(0, size) if padding_side == "right" else slice(length - size, length)
        input_ids[row, span] = example.input_ids
        labels[row, span] = example.labels
        attention_mask[row, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    pixels = [example.pixel_values for example in examples if example.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch
