"""The dataset: images padded to square, text-only and multi-image rows, safe truncation, batches for the engine."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import epic
from epic.data.dataset import LlavaDataset, collate, image_token_count
from epic.data.images import mean_colour
from epic.data.templates import get_template
from epic.labels import IGNORE_INDEX


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (48, 24), (255, 0, 0)).save(images / "wide.png")
    Image.new("L", (30, 30), 128).save(images / "gray.png")
    rows = [
        {
            "id": "one",
            "image": "wide.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is it?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "How many circles?"}, {"from": "gpt", "value": "2"}],
        },
        {
            "id": "two",
            "image": ["wide.png", "gray.png"],
            "conversations": [
                {"from": "human", "value": "<image> <image>\nIs there a red circle?"},
                {"from": "gpt", "value": "yes"},
            ],
        },
    ]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    return tmp_path


def dataset(folder, processor, **kwargs):
    return LlavaDataset(folder / "data.json", folder / "images", processor, get_template("vicuna_v1"), **kwargs)


def test_items_have_images_tokens_and_labels(folder, tiny):
    _, processor = tiny
    data = dataset(folder, processor)
    n = image_token_count(processor)
    assert n == (48 // 6) ** 2
    one, text, two = data[0], data[1], data[2]
    assert one.pixel_values.shape == (1, 3, 48, 48) and two.pixel_values.shape == (2, 3, 48, 48)
    assert text.pixel_values is None
    assert (one.input_ids == processor.image_token_id).sum() == n
    assert (two.input_ids == processor.image_token_id).sum() == 2 * n
    assert processor.tokenizer.decode(one.labels[one.labels != IGNORE_INDEX]) == "red </s>"
    assert data.lengths[0] > 0 and data.lengths[1] < 0  # sampler convention: text-only rows negative


def test_pad_mode_fills_with_the_mean_colour(folder, tiny):
    _, processor = tiny
    padded = dataset(folder, processor, image_mode="pad")[0].pixel_values[0]
    resized = dataset(folder, processor, image_mode="resize")[0].pixel_values[0]
    # a 48x24 red image padded to 48x48: top rows are the mean colour, which normalises to ~0
    assert padded[:, :8].abs().max() < 0.02
    assert padded[0, 24, 24].item() > 1.0  # the red stripe in the middle
    assert resized[0, 0, 0].item() > 1.0  # resize mode fills the whole square (centre crop of a resize)
    assert mean_colour(processor.image_processor) == (122, 116, 104)  # as LLaVA truncates


def test_truncation_keeps_images_whole(folder, tiny):
    _, processor = tiny
    full = dataset(folder, processor, max_length=None)
    length = len(full[0].input_ids)
    cut = dataset(folder, processor, max_length=length - 1, on_error="skip")
    assert len(cut[0].input_ids) == length - 1
    assert (cut[0].labels != IGNORE_INDEX).sum() == 1  # "red" kept, "</s>" cut
    n = image_token_count(processor)
    too_short = dataset(folder, processor, max_length=n, on_error="skip")  # would cut every image
    assert [record.record_id for record in too_short.records] == ["text"]
    assert {problem.record_id for problem in too_short.skipped} == {"one", "two"}


def test_collated_batch_runs_through_a_compressed_model(folder, tiny):
    model, processor = tiny
    data = dataset(folder, processor)
    batch = collate([data[i] for i in range(3)], processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 3
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(data[i].input_ids) for i in range(3)]
    with torch.no_grad(), epic.compress(model, "dart", tokens=8) as state:
        out = model(**batch)
    assert torch.isfinite(out.loss)
    assert [kept.numel() for kept in state.kept] == [8, 0, 16]
    left = collate([data[i] for i in range(3)], processor.tokenizer.pad_token_id, padding_side="left")
    assert left["attention_mask"][:, -1].all()
