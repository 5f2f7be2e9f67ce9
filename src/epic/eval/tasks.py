"""Task scoring: from evaluation items and predictions to metrics, per task layout."""

from __future__ import annotations

from collections import defaultdict

from epic.eval.runner import EvalItem
from epic.eval.scorers import ChoiceRecord, PopeRecord, exact_match_score, multiple_choice_score, pope_score


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


TASKS = {"shapes": score_shapes}
