"""Benchmark file layouts: POPE and GQA read as released, bad layouts refused, scored end to end."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from epic.cli import main
from epic.data.shapes import SynthConfig, vocabulary_texts
from epic.eval.tasks import SHORT_ANSWER, load_gqa, load_pope, score_gqa, score_pope
from epic.models.factory import build_tiny_llava_with_processor, save_llava
from epic.models.tiny import TinyLlavaSpec


@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    for name in ("COCO_1.jpg", "COCO_2.jpg", "n1.jpg"):
        Image.new("RGB", (40, 30), (120, 60, 200)).save(images / name)
    pope = tmp_path / "pope"
    pope.mkdir()
    for split in ("random", "adversarial"):
        rows = [
            {"question_id": 1, "image": "COCO_1.jpg", "text": "Is there a red circle in the image?", "label": "yes"},
            {"question_id": 2, "image": "COCO_2.jpg", "text": "Is there a blue square in the image?", "label": "no"},
        ]
        (pope / f"coco_pope_{split}.json").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    gqa = tmp_path / "testdev_balanced_questions.json"
    gqa.write_text(json.dumps({"q1": {"imageId": "n1", "question": "What color is the shape?", "answer": "red"}}))
    return tmp_path


def test_pope_layout(coco):
    items = load_pope(coco / "pope", coco / "val2014")
    assert [item.item_id for item in items] == ["adversarial-1", "adversarial-2", "random-1", "random-2"]
    assert items[0].turns[0].text.endswith(SHORT_ANSWER) and items[0].turns[0].text.startswith("<image>\n")
    predictions = {"adversarial-1": "Yes", "adversarial-2": "yes", "random-1": "yes", "random-2": "no"}
    metrics = score_pope(items, predictions)
    assert metrics["pope"]["random"]["f1"] == 100.0 and metrics["overall"] == pytest.approx((100.0 + 200 / 3) / 2)


def test_gqa_layout(coco):
    items = load_gqa(coco / "testdev_balanced_questions.json", coco / "val2014")
    assert items[0].answer == "red" and items[0].images[0].name == "n1.jpg"
    assert score_gqa(items, {"q1": "Red."})["overall"] == 100.0


def test_bad_layouts_are_refused(coco):
    (coco / "pope" / "coco_pope_other.json").write_text("{}\n")
    with pytest.raises(ValueError, match="must say its split"):
        load_pope(coco / "pope", coco / "val2014")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gqa(coco / "testdev_balanced_questions.json", coco / "pope")
    (coco / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a GQA question file"):
        load_gqa(coco / "bad.json", coco / "val2014")
    (coco / "pope2").mkdir()
    (coco / "pope2" / "x_random.json").write_text('{"image": "COCO_1.jpg"}\n')
    with pytest.raises(ValueError, match="line 1: not a POPE row"):
        load_pope(coco / "pope2", coco / "val2014")


def test_eval_command_on_pope(coco, tmp_path):
    model, processor = build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), TinyLlavaSpec())
    save_llava(model, processor, tmp_path / "model", "vicuna_v1")
    assert (
        main(
            [
                "eval",
                str(tmp_path / "model"),
                "--task",
                "pope",
                "--data",
                str(coco / "pope"),
                "--images",
                str(coco / "val2014"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["pope"]) >= {"random", "adversarial", "all", "mean_f1"}
