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


def test_vqa_layout(tmp_path):
    from epic.eval.tasks import load_vqa, score_vqa

    images = tmp_path / "val2014"
    images.mkdir()
    Image.new("RGB", (20, 20)).save(images / "COCO_val2014_000000000042.jpg")
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({"questions": [{"image_id": 42, "question": "How many dogs?", "question_id": 7}]})
    )
    answers = [{"answer": a} for a in ["2", "two", "2", "3", "2", "2", "2", "1", "2", "2"]]
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(
        json.dumps({"annotations": [{"question_id": 7, "image_id": 42, "answers": answers}]})
    )
    items = load_vqa(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", images)
    assert items[0].extra["answers"][1] == "two"
    assert score_vqa(items, {"7": "Two"})["overall"] == 100.0
    assert score_vqa(items, {"7": "3"})["overall"] == pytest.approx(100 / 3)


def test_mme_layout(tmp_path):
    from epic.eval.tasks import load_mme, score_mme

    for subtask, nested in (("existence", False), ("code_reasoning", True)):
        folder = tmp_path / "MME" / subtask
        (folder / "images").mkdir(parents=True)
        (folder / "questions_answers_YN").mkdir()
        image_dir, text_dir = (folder / "images", folder / "questions_answers_YN") if nested else (folder, folder)
        Image.new("RGB", (20, 20)).save(image_dir / "a.jpg")
        (text_dir / "a.txt").write_text(
            "Is there a cat? Please answer yes or no.\tYes\nIs there a dog? Please answer yes or no.\tNo\n"
        )
    items = load_mme(tmp_path / "MME", None)
    assert len(items) == 4 and items[0].extra["image"] == "code_reasoning/a"
    predictions = {item.item_id: item.answer for item in items}
    metrics = score_mme(items, predictions)
    assert metrics["overall"] == 200.0 and metrics["cognition"] == 200.0
    (tmp_path / "MME" / "poetry").mkdir()
    with pytest.raises(ValueError, match="not an MME subtask"):
        load_mme(tmp_path / "MME", None)


def test_mmbench_layout_and_circular(tmp_path):
    import base64
    import io

    from epic.eval.tasks import load_mmbench, score_mmbench

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\timage"
    rows = [
        f"5\tWhat color?\tnan\tred\tblue\tgreen\tpink\tA\t{image}",
        f"1000005\tWhat color?\tnan\tblue\tgreen\tpink\tred\tD\t{image}",
    ]
    (tmp_path / "mmbench.tsv").write_text("\n".join([header, *rows]) + "\n")
    items = load_mmbench(tmp_path / "mmbench.tsv", None)
    assert items[0].turns[0].text.splitlines()[2] == "A. red" and items[1].extra["question"] == "5"
    assert isinstance(items[0].images[0], Image.Image)
    metrics = score_mmbench(items, {"5": "A", "1000005": "B"})
    assert metrics["single_pass"] == 50.0 and metrics["circular"] == 0.0


def test_embedded_images_go_through_the_runner(tmp_path):
    import base64
    import io

    from epic.data.templates import get_template
    from epic.eval.runner import generate_answers
    from epic.eval.tasks import load_mmbench

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    (tmp_path / "m.tsv").write_text(
        f"index\tquestion\thint\tA\tB\tanswer\timage\n1\tColor?\tnan\tred\tblue\tA\t{image}\n"
    )
    model, processor = build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), TinyLlavaSpec())
    items = load_mmbench(tmp_path / "m.tsv", None)
    answers = generate_answers(model, processor, get_template("vicuna_v1"), items, tmp_path / "p.jsonl", progress=False)
    assert list(answers) == ["1"]


def test_scienceqa_image_questions(tmp_path):
    from epic.eval.tasks import load_scienceqa, score_scienceqa

    (tmp_path / "test" / "7").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "test" / "7" / "image.png")
    problems = {
        "7": {
            "question": "Which is a mammal?",
            "choices": ["frog", "whale"],
            "answer": 1,
            "hint": "Animals.",
            "image": "image.png",
            "split": "test",
        },
        "8": {
            "question": "No image here?",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "image": None,
            "split": "test",
        },
        "9": {"question": "Train split", "choices": ["a", "b"], "answer": 0, "image": "image.png", "split": "train"},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    items = load_scienceqa(tmp_path / "problems.json", tmp_path)
    assert [item.item_id for item in items] == ["7"] and items[0].answer == "B"
    assert "Context: Animals.\nWhich is a mammal?\nA. frog\nB. whale" in items[0].turns[0].text
    assert score_scienceqa(items, {"7": "B"})["overall"] == 100.0
