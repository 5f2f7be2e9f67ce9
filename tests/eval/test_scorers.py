"""Scorers against hand-computed cases."""

from __future__ import annotations

import pytest

from epic.eval.scorers import (
    MME_COGNITION,
    MME_PERCEPTION,
    ChoiceRecord,
    MmeRecord,
    PopeRecord,
    exact_match_score,
    mme_score,
    multiple_choice_score,
    normalize_answer,
    option_letter,
    pope_score,
    vqa_score,
    vqa_soft_accuracy,
    yes_no,
)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),
        ("The dog.", "dog"),
        ("a red  Car!", "red car"),
        ("dont know", "don't know"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("yes, it is", "yes it is"),
        ("none", "0"),
        ("  Left\n", "left"),
    ],
)
def test_vqa_normalisation(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_soft_accuracy_by_hand():
    answers = ["2", "two", "2", "3", "3", "3", "3", "4", "2 ", "none"]
    assert vqa_soft_accuracy("Two", answers) == 1.0  # 4 annotators said 2 (after normalisation)
    assert vqa_soft_accuracy("4", answers) == pytest.approx(1 / 3)
    assert vqa_soft_accuracy("0", answers) == pytest.approx(1 / 3)  # "none" -> 0
    assert vqa_soft_accuracy("5", answers) == 0.0
    assert vqa_score([("2", answers), ("4", answers)])["accuracy"] == pytest.approx(100 * (1 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="annotators"):
        vqa_soft_accuracy("2", [])


@pytest.mark.parametrize(("agreeing", "official"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out_form(agreeing, official):
    answers = ["cat"] * agreeing + ["dog"] * (10 - agreeing)
    assert vqa_soft_accuracy("cat", answers, leave_one_out=True) == pytest.approx(official)


def test_gqa_exact_match():
    result = exact_match_score([("The table.", "table"), ("Yes", "yes"), ("left side", "left")])
    assert result == {"accuracy": pytest.approx(200 / 3), "questions": 3}


@pytest.mark.parametrize(
    ("text", "word"),
    [("Yes", "yes"), ("No, there is not.", "no"), ("There is not a dog", "no"), ("yes.", "yes"), ("maybe", None)],
)
def test_yes_no_parsing(text, word):
    assert yes_no(text) == word


def test_pope_metrics_by_hand():
    records = [
        PopeRecord("yes", "yes", "random"),
        PopeRecord("yes", "no", "random"),
        PopeRecord("no", "yes", "random"),
        PopeRecord("no", "no", "random"),
        PopeRecord("Yes", "yes", "popular"),
        PopeRecord("yes", "yes", "popular"),
        PopeRecord("uh", "no", "popular"),  # unparsed: wrong, not a yes
        PopeRecord("no", "no", "popular"),
    ]
    result = pope_score(records)
    random = result["random"]
    assert (random["accuracy"], random["precision"], random["recall"], random["f1"]) == (50.0, 50.0, 50.0, 50.0)
    assert random["yes_ratio"] == 50.0
    popular = result["popular"]
    assert popular["accuracy"] == 75.0 and popular["precision"] == 100.0 and popular["recall"] == 100.0
    assert popular["f1"] == 100.0 and popular["yes_ratio"] == 50.0 and popular["unparsed"] == 1
    assert result["mean_f1"] == 75.0
    assert result["all"]["questions"] == 8
    with pytest.raises(ValueError, match="yes or no"):
        pope_score([PopeRecord("yes", "maybe")])


def test_pope_all_no_predictions_have_zero_f1():
    result = pope_score([PopeRecord("no", "yes"), PopeRecord("no", "no")])
    assert result["all"]["f1"] == 0.0 and result["all"]["accuracy"] == 50.0


def test_mme_accuracy_plus_and_sums():
    records = [
        MmeRecord("existence", "img1", "Yes", "Yes"),
        MmeRecord("existence", "img1", "No", "No"),  # both right: counts for acc+
        MmeRecord("existence", "img2", "Yes", "Yes"),
        MmeRecord("existence", "img2", "Yes", "No"),  # one wrong
        MmeRecord("code_reasoning", "img3", "No", "Yes"),
        MmeRecord("code_reasoning", "img3", "No", "No"),
    ]
    result = mme_score(records)
    existence = result["subtasks"]["existence"]
    assert existence == {"accuracy": 75.0, "accuracy_plus": 50.0, "score": 125.0}
    assert result["perception"] == 125.0
    assert result["cognition"] == 50.0 + 0.0
    assert len(MME_PERCEPTION) == 10 and len(MME_COGNITION) == 4
    with pytest.raises(ValueError, match="unknown MME subtask"):
        mme_score([MmeRecord("poetry", "i", "Yes", "Yes")])


@pytest.mark.parametrize(
    ("text", "letter"),
    [("B", "B"), ("B.", "B"), ("(C) a cat", "C"), ("D) dog", "D"), ("The answer is A.", "A"), ("Because", None)],
)
def test_option_letters(text, letter):
    assert option_letter(text) == letter


def test_multiple_choice_and_circular():
    records = [
        ChoiceRecord("A", "A", "q1"),
        ChoiceRecord("B", "C", "q1"),  # one rotation wrong: q1 fails circular
        ChoiceRecord("D", "D", "q2"),
        ChoiceRecord("(A)", "A", "q2"),
    ]
    assert multiple_choice_score(records)["accuracy"] == 75.0
    assert multiple_choice_score(records, circular=True) == {"accuracy": 50.0, "questions": 2}
    with pytest.raises(ValueError, match="question id"):
        multiple_choice_score([ChoiceRecord("A", "A")], circular=True)
    with pytest.raises(ValueError, match="no records"):
        multiple_choice_score([])
