"""The synthetic set: deterministic, balanced, and not answerable without the image."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from epic.cli import main
from epic.data.records import read_records
from epic.data.shapes import COLOURS, KINDS, LETTERS, POPE_SPLITS, QUESTION_TYPES, SynthConfig, write_synthetic

CONFIG = SynthConfig(n_train=6000, n_val=50, n_test=5000, n_captions=10, seed=11)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("balance")
    write_synthetic(folder, CONFIG)
    return {split: json.loads((folder / f"{split}.json").read_text()) for split in ("train", "val", "test")}, folder


def test_same_seed_same_set_other_seed_other_set(tmp_path):
    small = SynthConfig(n_train=40, n_val=5, n_test=10, n_captions=5, seed=3)
    write_synthetic(tmp_path / "a", small)
    write_synthetic(tmp_path / "b", small)
    write_synthetic(tmp_path / "c", SynthConfig(**{**small.__dict__, "seed": 4}))
    for name in ("train.json", "test.json", "captions.json", "images/train/000005.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.json").read_text() != (tmp_path / "c" / "train.json").read_text()


def test_files_are_valid_llava_data(shapes):
    _, folder = shapes
    for split in ("train", "val", "test", "captions"):
        report = read_records(folder / f"{split}.json", folder / "images")
        assert not report.problems and report.records


def test_question_types_and_answers(shapes):
    rows = shapes[0]["train"]
    assert set(Counter(row["type"] for row in rows)) == set(QUESTION_TYPES)
    answers = {kind: {row["answer"] for row in rows if row["type"] == kind} for kind in QUESTION_TYPES}
    assert answers["colour"] == set(COLOURS)
    assert answers["exists"] == answers["relation"] == {"yes", "no"}
    assert answers["choice"] == set(LETTERS)
    assert answers["count"] <= {str(n) for n in range(10)}
    exists = [row for row in shapes[0]["test"] if row["type"] == "exists"]
    for split in POPE_SPLITS:
        votes = Counter(row["answer"] for row in exists if row["pope_split"] == split)
        assert abs(votes["yes"] - votes["no"]) <= 0.2 * sum(votes.values()), (split, votes)
    assert any(kind in row["question"] for row in rows for kind in KINDS)


def test_questions_alone_do_not_beat_the_majority_answer(shapes):
    """A text-only model: the best answer per exact question text, learnt on train, scored on test."""
    train, test = shapes[0]["train"], shapes[0]["test"]
    for kind in QUESTION_TYPES:
        by_question = defaultdict(Counter)
        overall = Counter()
        for row in train:
            if row["type"] == kind:
                by_question[row["question"]][row["answer"]] += 1
                overall[row["answer"]] += 1
        majority = overall.most_common(1)[0][0]
        rows = [row for row in test if row["type"] == kind]
        guess = [
            by_question[row["question"]].most_common(1)[0][0] if row["question"] in by_question else majority
            for row in rows
        ]
        text_only = sum(g == row["answer"] for g, row in zip(guess, rows, strict=True)) / len(rows)
        baseline = Counter(row["answer"] for row in rows).most_common(1)[0][1] / len(rows)  # test's majority class
        assert text_only <= baseline + 0.05, (kind, text_only, baseline)


def test_synth_command(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "synth",
                str(tmp_path),
                "--n-train",
                "20",
                "--n-val",
                "5",
                "--n-test",
                "5",
                "--n-captions",
                "5",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert "wrote the shapes set" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "train.json").read_text())) == 20
