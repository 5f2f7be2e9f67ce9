"""Tasks: reading each benchmark's own file layout into evaluation items, and scoring their predictions.

| task | file (`--data`) | images (`--images`) |
| --- | --- | --- |
| `shapes` | the built-in set's LLaVA-format JSON (`type`, `answer`, `pope_split` fields) | its `images/` |
| `pope` | POPE's release: JSON lines `{"question_id", "image", "text", "label"}`, one file per split named
  `*_random.json`, `*_popular.json`, `*_adversarial.json` (`--data` may be one of them or their folder) | COCO val2014 |
| `gqa` | GQA's release: `{question_id: {"imageId", "question", "answer", ...}}` (e.g. testdev_balanced_questions.json)
  | `{imageId}.jpg` |

Prompts follow LLaVA-1.5's evaluation: the question, then "Answer the question using a single word or phrase."
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from epic.data.templates import IMAGE_PLACEHOLDER, Turn
from epic.eval.runner import EvalItem, load_items
from epic.eval.scorers import ChoiceRecord, PopeRecord, exact_match_score, multiple_choice_score, pope_score

SHORT_ANSWER = "Answer the question using a single word or phrase."
POPE_SPLITS = ("random", "popular", "adversarial")


def score_shapes(items: list[EvalItem], predictions: dict[str, str]) -> dict[str, object]:
    """The built-in shapes set: accuracy per question type and overall (percent); POPE metrics for `exists`.

    Types answered by a word or a number use exact match after normalisation; `choice` reads the option letter.
    """
    by_type: dict[str, list[EvalItem]] = defaultdict(list)
    for item in items:
        by_type[item.extra.get("type", "unknown")].append(item)
    metrics: dict[str, object] = {}
    correct = 0.0
    for kind, group in sorted(by_type.items()):
        if kind == "choice":
            score = multiple_choice_score([ChoiceRecord(predictions[i.item_id], i.answer) for i in group])
        else:
            score = exact_match_score([(predictions[i.item_id], i.answer) for i in group])
        metrics[kind] = score["accuracy"]
        correct += score["accuracy"] * len(group) / 100.0
    exists = by_type.get("exists", [])
    if exists:
        metrics["pope"] = pope_score(
            [PopeRecord(predictions[i.item_id], i.answer, i.extra.get("pope_split", "all")) for i in exists]
        )
    metrics["overall"] = 100.0 * correct / len(items)
    return metrics


def _image(folder: Path | None, name: str) -> Path:
    if folder is None:
        raise ValueError("this task needs --images (the folder of its images)")
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"image {name!r} not found in {folder}")
    return path


def _question(text: str) -> list[Turn]:
    return [Turn("user", f"{IMAGE_PLACEHOLDER}\n{text}\n{SHORT_ANSWER}")]


def load_pope(data: Path, images: Path | None) -> list[EvalItem]:
    """POPE's JSON-lines files; the split comes from the file name."""
    files = sorted(Path(data).glob("*.json")) if Path(data).is_dir() else [Path(data)]
    items = []
    for file in files:
        split = next((name for name in POPE_SPLITS if name in file.stem), None)
        if split is None:
            raise ValueError(f"{file}: a POPE file name must say its split ({', '.join(POPE_SPLITS)})")
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, label, image = row["text"], row["label"], row["image"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{file} line {number}: not a POPE row ({error})") from error
            item_id = f"{split}-{row.get('question_id', number)}"
            items.append(EvalItem(item_id, _question(question), [_image(images, image)], label, {"pope_split": split}))
    if not items:
        raise ValueError(f"{data}: no POPE question")
    return items


def score_pope(items: list[EvalItem], predictions: dict[str, str]) -> dict[str, object]:
    result = pope_score(
        [PopeRecord(predictions[item.item_id], item.answer, item.extra["pope_split"]) for item in items]
    )
    return {"overall": result["mean_f1"], "pope": result}


def load_gqa(data: Path, images: Path | None) -> list[EvalItem]:
    """GQA's question file: {question_id: {"imageId", "question", "answer"}}."""
    try:
        questions = json.loads(Path(data).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{data}: malformed JSON ({error})") from error
    if not isinstance(questions, dict) or not questions:
        raise ValueError(f"{data}: not a GQA question file (a mapping from question id to question)")
    items = []
    for question_id, row in questions.items():
        try:
            image, question, answer = row["imageId"], row["question"], row["answer"]
        except (KeyError, TypeError) as error:
            raise ValueError(f"{data} question {question_id}: not a GQA question ({error})") from error
        items.append(EvalItem(str(question_id), _question(question), [_image(images, f"{image}.jpg")], answer))
    return items


def score_gqa(items: list[EvalItem], predictions: dict[str, str]) -> dict[str, object]:
    return {"overall": exact_match_score([(predictions[item.item_id], item.answer) for item in items])["accuracy"]}


LOADERS = {"shapes": load_items, "pope": load_pope, "gqa": load_gqa}
TASKS = {"shapes": score_shapes, "pope": score_pope, "gqa": score_gqa}
