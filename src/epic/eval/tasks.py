"""Tasks: reading each benchmark's own file layout into evaluation items, and scoring their predictions.

| task | file (`--data`) | images (`--images`) |
| --- | --- | --- |
| `shapes` | the built-in set's LLaVA-format JSON (`type`, `answer`, `pope_split` fields) | its `images/` |
| `pope` | POPE's release: JSON lines `{"question_id", "image", "text", "label"}`, one file per split named
  `*_random.json`, `*_popular.json`, `*_adversarial.json` (`--data` may be one of them or their folder) | COCO val2014 |
| `gqa` | GQA's release: `{question_id: {"imageId", "question", "answer", ...}}` (e.g. testdev_balanced_questions.json)
  | `{imageId}.jpg` |
| `vqa` | VQAv2's questions file `{"questions": [...]}`, its annotations file beside it (name with "annotations") |
  `COCO_val2014_{image_id:012d}.jpg` |
| `mme` | the MME release folder: one folder per subtask, images with a same-named .txt of "question<TAB>answer" lines
  (directly or under images/ and questions_answers_YN/) | (inside) |
| `mmbench` | MMBench's TSV (index, question, hint, A-D, answer, image as base64); circular rotations share
  index mod 1,000,000 | (inside) |
| `sqa` | ScienceQA's problems.json `{pid: {"question", "choices", "answer", "hint", "image", "split"}}`, its test
  questions with an image (SQA-IMG) | `test/{pid}/image.png` |

Prompts follow LLaVA-1.5's evaluation: the question, then "Answer the question using a single word or phrase."
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from PIL import Image

from epic.data.shapes import chance_accuracy
from epic.data.templates import IMAGE_PLACEHOLDER, Turn
from epic.eval.runner import EvalItem, load_items
from epic.eval.scorers import (
    MME_COGNITION,
    MME_PERCEPTION,
    ChoiceRecord,
    MmeRecord,
    PopeRecord,
    exact_match_score,
    mme_score,
    multiple_choice_score,
    pope_score,
    vqa_score,
)

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


def load_vqa(data: Path, images: Path | None) -> list[EvalItem]:
    """VQAv2: the questions file and, beside it, the annotations file (ten answers per question)."""
    data = Path(data)
    candidates = [path for path in data.parent.glob("*annotations*.json") if path != data]
    if len(candidates) != 1:
        raise ValueError(f"{data}: expected exactly one *annotations*.json beside it, found {len(candidates)}")
    try:
        questions = json.loads(data.read_text())["questions"]
        annotations = {row["question_id"]: row for row in json.loads(candidates[0].read_text())["annotations"]}
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{data}: not VQAv2 questions and annotations ({error})") from error
    items = []
    for row in questions:
        annotation = annotations.get(row["question_id"])
        if annotation is None:
            raise ValueError(f"{candidates[0]}: no annotation for question {row['question_id']}")
        answers = [answer["answer"] for answer in annotation["answers"]]
        image = _image(images, f"COCO_val2014_{row['image_id']:012d}.jpg")
        items.append(
            EvalItem(str(row["question_id"]), _question(row["question"]), [image], answers[0], {"answers": answers})
        )
    if not items:
        raise ValueError(f"{data}: no VQA question")
    return items


def score_vqa(items: list[EvalItem], predictions: dict[str, str]) -> dict[str, object]:
    return {"overall": vqa_score([(predictions[item.item_id], item.extra["answers"]) for item in items])["accuracy"]}


MME_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def load_mme(data: Path, images: Path | None) -> list[EvalItem]:
    """The MME release: per subtask folder, every image has a .txt of 'question<TAB>answer' lines (two)."""
    items = []
    for subtask in sorted(path for path in Path(data).iterdir() if path.is_dir()):
        if subtask.name not in MME_PERCEPTION + MME_COGNITION:
            raise ValueError(f"{subtask}: not an MME subtask ({', '.join(MME_PERCEPTION + MME_COGNITION)})")
        texts = sorted(subtask.rglob("*.txt"))
        pictures = {path.stem: path for path in subtask.rglob("*") if path.suffix.lower() in MME_IMAGE_SUFFIXES}
        for text in texts:
            if text.stem not in pictures:
                raise FileNotFoundError(f"{text}: no image named {text.stem} in {subtask}")
            for number, line in enumerate(text.read_text().splitlines()):
                if not line.strip():
                    continue
                question, _, answer = line.rpartition("\t")
                if not question or answer.strip() not in ("Yes", "No"):
                    raise ValueError(f"{text} line {number + 1}: expected 'question<TAB>Yes|No'")
                image = f"{subtask.name}/{text.stem}"
                items.append(
                    EvalItem(
                        f"{image}/{number}",
                        [Turn("user", f"{IMAGE_PLACEHOLDER}\n{question}")],
                        [pictures[text.stem]],
                        answer.strip(),
                        {"subtask": subtask.name, "image": image},
                    )
                )
    if not items:
        raise ValueError(f"{data}: no MME question")
    return items


def score_mme(items: list[EvalItem], predictions: dict[str, str]) -> dict[str, object]:
    result = mme_score(
        [
            MmeRecord(item.extra["subtask"], item.extra["image"], predictions[item.item_id], item.answer)
            for item in items
        ]
    )
    return {"overall": result["perception"], **result}


MMBENCH_SUFFIX = "Answer with the option's letter from the given choices directly."


def load_mmbench(data: Path, images: Path | None) -> list[EvalItem]:
    """MMBench's TSV: images embedded as base64; rotations of one question share `index` mod 1,000,000."""
    import base64
    import csv
    import io

    items = []
    with open(data, newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            try:
                picture = Image.open(io.BytesIO(base64.b64decode(row["image"])))
                picture.load()
                options = [f"{letter}. {row[letter]}" for letter in "ABCD" if row.get(letter) not in (None, "", "nan")]
                hint = row.get("hint") or ""
                hint = "" if hint == "nan" else f"{hint}\n"
                prompt = f"{IMAGE_PLACEHOLDER}\n{hint}{row['question']}\n" + "\n".join(options) + f"\n{MMBENCH_SUFFIX}"
                index = int(row["index"])
            except (KeyError, ValueError, OSError) as error:
                raise ValueError(f"{data}: not an MMBench row ({error})") from error
            items.append(
                EvalItem(
                    str(index), [Turn("user", prompt)], [picture], row["answer"], {"question": str(index % 1_000_000)}
                )
            )
    if not items:
        raise ValueError(f"{data}: no MMBench question")
    return items


def score_mmbench(items: list[EvalItem], predictions: dict[str, str]) -> dict[str, object]:
    records = [ChoiceRecord(predictions[item.item_id], item.answer, item.extra["question"]) for item in items]
    circular = multiple_choice_score(records, circular=True)["accuracy"]
    return {"overall": circular, "circular": circular, "single_pass": multiple_choice_score(records)["accuracy"]}


def load_scienceqa(data: Path, images: Path | None) -> list[EvalItem]:
    """ScienceQA-IMG: the test questions of problems.json that have an image; the answer is an option letter."""
    try:
        problems = json.loads(Path(data).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{data}: malformed JSON ({error})") from error
    if not isinstance(problems, dict):
        raise ValueError(f"{data}: not ScienceQA's problems.json (a mapping from problem id to problem)")
    items = []
    for pid, problem in problems.items():
        try:
            if problem.get("split") != "test" or not problem.get("image"):
                continue
            options = [f"{chr(65 + index)}. {choice}" for index, choice in enumerate(problem["choices"])]
            hint = f"Context: {problem['hint']}\n" if problem.get("hint") else ""
            answer = chr(65 + int(problem["answer"]))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{data} problem {pid}: not a ScienceQA problem ({error})") from error
        prompt = f"{IMAGE_PLACEHOLDER}\n{hint}{problem['question']}\n" + "\n".join(options) + f"\n{MMBENCH_SUFFIX}"
        image = _image(images, f"test/{pid}/{problem['image']}")
        items.append(EvalItem(str(pid), [Turn("user", prompt)], [image], answer))
    if not items:
        raise ValueError(f"{data}: no test question with an image")
    return items


def score_scienceqa(items: list[EvalItem], predictions: dict[str, str]) -> dict[str, object]:
    records = [ChoiceRecord(predictions[item.item_id], item.answer) for item in items]
    return {"overall": multiple_choice_score(records)["accuracy"]}


LOADERS = {
    "shapes": load_items,
    "pope": load_pope,
    "gqa": load_gqa,
    "vqa": load_vqa,
    "mme": load_mme,
    "mmbench": load_mmbench,
    "mc": load_mmbench,  # multiple choice by letter, in MMBench's layout
    "sqa": load_scienceqa,
}


def chance_level(task: str, items: list[EvalItem]) -> float | None:
    """The overall accuracy (percent) of a uniform guess, where the task defines one: the shapes set's per-type
    answer counts over these items' types; None elsewhere (and for shapes items of an unknown type)."""
    if task != "shapes":
        return None
    return chance_accuracy(item.extra.get("type", "unknown") for item in items)


TASKS = {
    "shapes": score_shapes,
    "pope": score_pope,
    "gqa": score_gqa,
    "vqa": score_vqa,
    "mme": score_mme,
    "mmbench": score_mmbench,
    "mc": score_mmbench,
    "sqa": score_scienceqa,
}
