"""Benchmark scorers as pure functions over (prediction, reference) records (SPEC section 5).

- POPE: yes/no; accuracy, precision, recall, F1 (positive = yes), yes-ratio; per split and the mean F1 over splits,
  which is what papers quote.
- MME: per subtask accuracy and accuracy-plus (both questions of an image right), subtask score = acc + acc+;
  perception = sum over its 10 subtasks (max 2000), cognition = sum over its 4 (max 800).
- VQAv2-style soft accuracy: min(#annotators who gave the answer / 3, 1) after the standard answer normalisation.
- GQA: exact match after the same normalisation.
- Multiple choice (MMBench, SQA-I): the option letter; MMBench's circular evaluation counts a question right only
  when every rotation of its options is answered right.
Scores are percentages (0-100), MME's are points.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {  # the common apostrophe-less spellings, as VQA's evaluation restores them
    "arent": "aren't",
    "cant": "can't",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hes": "he's",
    "im": "i'm",
    "isnt": "isn't",
    "itd": "it'd",
    "itll": "it'll",
    "ive": "i've",
    "lets": "let's",
    "shes": "she's",
    "shouldnt": "shouldn't",
    "thats": "that's",
    "theres": "there's",
    "theyre": "they're",
    "theyve": "they've",
    "wasnt": "wasn't",
    "werent": "weren't",
    "whats": "what's",
    "wheres": "where's",
    "whos": "who's",
    "wont": "won't",
    "wouldnt": "wouldn't",
    "youre": "you're",
    "youve": "you've",
}
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!*#%^&$:'
PERIOD_NOT_IN_NUMBER = re.compile(r"(?<!\d)\.(?!\d)")
COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def normalize_answer(text: str) -> str:
    """VQA's answer normalisation: spacing, punctuation (commas inside numbers kept apart), periods outside
    numbers, lower case, number words to digits, articles dropped, contractions restored."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or COMMA_IN_NUMBER.search(text) is not None:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = PERIOD_NOT_IN_NUMBER.sub("", text)
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_soft_accuracy(prediction: str, annotator_answers: list[str], leave_one_out: bool = False) -> float:
    """min(#annotators who gave the (normalised) prediction / 3, 1), in [0, 1].

    `leave_one_out` gives the official VQA evaluation's form (and lmms-eval's): the same quantity averaged over the
    subsets that leave out one annotator each.
    """
    if not annotator_answers:
        raise ValueError("a VQA question needs its annotators' answers")
    predicted = normalize_answer(prediction)
    matching = [normalize_answer(answer) == predicted for answer in annotator_answers]
    if not leave_one_out:
        return min(sum(matching) / 3.0, 1.0)
    total = sum(matching)
    return sum(min((total - left_out) / 3.0, 1.0) for left_out in matching) / len(matching)


def vqa_score(records: Iterable[tuple[str, list[str]]], leave_one_out: bool = False) -> dict[str, float]:
    """Mean soft accuracy (percent) over (prediction, annotator answers) pairs."""
    scores = [vqa_soft_accuracy(prediction, answers, leave_one_out) for prediction, answers in records]
    return {"accuracy": 100.0 * sum(scores) / _count(scores), "questions": len(scores)}


def exact_match_score(records: Iterable[tuple[str, str]]) -> dict[str, float]:
    """GQA: the share (percent) of predictions equal to the answer after normalisation."""
    hits = [normalize_answer(prediction) == normalize_answer(answer) for prediction, answer in records]
    return {"accuracy": 100.0 * sum(hits) / _count(hits), "questions": len(hits)}


def yes_no(text: str) -> str | None:
    """'yes' or 'no' read from a free answer (its first yes/no word); None when it has neither."""
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in ("yes", "no"):
            return word
        if word == "not":
            return "no"
    return None


@dataclass(frozen=True)
class PopeRecord:
    prediction: str
    answer: str  # "yes" or "no"
    split: str = "all"  # random, popular or adversarial


def _binary_metrics(records: list[PopeRecord]) -> dict[str, float]:
    predicted = [yes_no(record.prediction) for record in records]
    truth = [record.answer.strip().lower() for record in records]
    true_positive = sum(p == "yes" and t == "yes" for p, t in zip(predicted, truth, strict=True))
    false_positive = sum(p == "yes" and t == "no" for p, t in zip(predicted, truth, strict=True))
    false_negative = sum(p != "yes" and t == "yes" for p, t in zip(predicted, truth, strict=True))
    correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
    precision = true_positive / (true_positive + false_positive) if true_positive + false_positive else 0.0
    recall = true_positive / (true_positive + false_negative) if true_positive + false_negative else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * correct / _count(records),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * sum(p == "yes" for p in predicted) / _count(records),
        "unparsed": sum(p is None for p in predicted),
        "questions": len(records),
    }


def pope_score(records: Iterable[PopeRecord]) -> dict[str, dict[str, float] | float]:
    """Metrics per split, over all, and the mean F1 over the splits (an unparsed answer counts as wrong)."""
    records = list(records)
    for record in records:
        if record.answer.strip().lower() not in ("yes", "no"):
            raise ValueError(f"a POPE answer must be yes or no, got {record.answer!r}")
    splits: dict[str, list[PopeRecord]] = defaultdict(list)
    for record in records:
        splits[record.split].append(record)
    result: dict[str, dict[str, float] | float] = {name: _binary_metrics(rows) for name, rows in sorted(splits.items())}
    result["all"] = _binary_metrics(records)
    result["mean_f1"] = sum(result[name]["f1"] for name in splits) / len(splits)
    return result


@dataclass(frozen=True)
class MmeRecord:
    subtask: str
    image: str
    prediction: str
    answer: str  # "Yes" or "No"


def mme_score(records: Iterable[MmeRecord]) -> dict[str, float | dict[str, dict[str, float]]]:
    """Per subtask accuracy, accuracy-plus and score (their sum); perception and cognition sums."""
    by_subtask: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        right = yes_no(record.prediction) == record.answer.strip().lower()
        by_subtask[record.subtask][record.image].append(right)
    unknown = sorted(set(by_subtask) - set(MME_PERCEPTION) - set(MME_COGNITION))
    if unknown:
        raise ValueError(f"unknown MME subtask(s) {unknown}; expected {MME_PERCEPTION + MME_COGNITION}")
    subtasks = {}
    for name, images in by_subtask.items():
        answers = [right for rights in images.values() for right in rights]
        accuracy = 100.0 * sum(answers) / len(answers)
        accuracy_plus = 100.0 * sum(all(rights) for rights in images.values()) / len(images)
        subtasks[name] = {"accuracy": accuracy, "accuracy_plus": accuracy_plus, "score": accuracy + accuracy_plus}
    return {
        "perception": sum(subtasks[name]["score"] for name in MME_PERCEPTION if name in subtasks),
        "cognition": sum(subtasks[name]["score"] for name in MME_COGNITION if name in subtasks),
        "subtasks": subtasks,
    }


def option_letter(text: str, letters: str = "ABCDE") -> str | None:
    """The option letter a free answer gives: 'B', 'B.', '(B)', 'B) ...', 'The answer is B'; None if none."""
    text = text.strip()
    match = re.match(rf"^\(?([{letters}])(?:[\).:,\s]|$)", text)
    if match:
        return match.group(1)
    match = re.search(rf"(?:answer|option)\s*(?:is|:)?\s*\(?([{letters}])\b", text, flags=re.IGNORECASE)
    if match:
        return match.group(1).upper()
    return None


@dataclass(frozen=True)
class ChoiceRecord:
    prediction: str
    answer: str  # the right letter
    question: str = ""  # MMBench: the id shared by the circular rotations of one question


def multiple_choice_score(records: Iterable[ChoiceRecord], circular: bool = False) -> dict[str, float]:
    """Letter accuracy (percent); with `circular`, a question counts only if all its rotations are right."""
    records = list(records)
    right = [option_letter(record.prediction) == record.answer.strip().upper() for record in records]
    if not circular:
        return {"accuracy": 100.0 * sum(right) / _count(right), "questions": len(right)}
    groups: dict[str, list[bool]] = defaultdict(list)
    for record, ok in zip(records, right, strict=True):
        if not record.question:
            raise ValueError("circular evaluation needs the question id shared by the rotations")
        groups[record.question].append(ok)
    return {"accuracy": 100.0 * sum(all(oks) for oks in groups.values()) / _count(groups), "questions": len(groups)}


def _count(items) -> int:
    if not len(items):
        raise ValueError("nothing to score: no records")
    return len(items)
