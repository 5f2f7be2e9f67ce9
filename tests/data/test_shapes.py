"""The synthetic set: deterministic, balanced, and not answerable without the image."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from epic.cli import main
from epic.data.records import read_records
from epic.data.shapes import (
    COLOURS,
    KINDS,
    LETTERS,
    POPE_SPLITS,
    QUESTION_TYPES,
    SynthConfig,
    chance_accuracy,
    write_synthetic,
)

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
    assert answers["colour"] == set(COLOURS) and answers["shape"] == set(KINDS)
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


def test_multi_turn_training_split_asks_each_scene_in_one_conversation(tmp_path):
    config = SynthConfig(n_train=50, n_val=5, n_test=20, n_captions=3, questions_per_scene=5, multi_turn_train=True)
    write_synthetic(tmp_path, config)
    train = json.loads((tmp_path / "train.json").read_text())
    assert len({row["image"] for row in train}) == len(train)  # one row per scene
    turns = [turn for row in train for turn in row["conversations"]]
    assert sum(turn["from"] == "gpt" for turn in turns) == 50  # every question is still asked
    for row in train:
        humans = [turn["value"] for turn in row["conversations"][::2]]
        assert humans[0].startswith("<image>\n") and not any("<image>" in text for text in humans[1:])
    test = json.loads((tmp_path / "test.json").read_text())
    assert all(len(row["conversations"]) == 2 for row in test)  # evaluation stays single-turn
    assert not read_records(tmp_path / "train.json", tmp_path / "images").problems


def test_question_types_subset_and_dense_scenes(tmp_path):
    config = SynthConfig(
        n_train=60,
        n_val=0,
        n_test=60,
        n_captions=2,
        grid=8,
        image_size=96,
        min_shapes=10,
        max_shapes=16,
        question_types=("count", "colour"),
    )
    write_synthetic(tmp_path, config)
    test = json.loads((tmp_path / "test.json").read_text())
    assert {row["type"] for row in test} == {"count", "colour"} and len(test) == 60
    assert all(int(row["answer"]) <= 3 for row in test if row["type"] == "count")  # dense scenes skip, never lie
    captions = json.loads((tmp_path / "captions.json").read_text())
    assert captions[0]["conversations"][0]["value"] == "<image>\nDescribe the image."
    with pytest.raises(ValueError, match="question_types"):
        SynthConfig(question_types=("colour", "smell"))


def test_multi_turn_order_says_nothing_about_the_question_type(tmp_path):
    config = SynthConfig(n_train=600, n_val=0, n_test=5, n_captions=0, questions_per_scene=6, multi_turn_train=True)
    write_synthetic(tmp_path, config)
    train = json.loads((tmp_path / "train.json").read_text())

    def question_type(text: str) -> str:
        for marker, kind in (("color", "colour"), ("letter", "choice"), ("What shape", "shape"), ("How many", "count")):
            if marker in text:
                return kind
        return "exists" if text.startswith("Is there") else "relation"

    first = Counter(question_type(row["conversations"][0]["value"].removeprefix("<image>\n")) for row in train)
    assert len(first) == 6 and min(first.values()) > len(train) / 12  # every type opens conversations


def test_places_captions_name_the_place_first_and_fit_their_vocabulary():
    import numpy as np

    from epic.data.shapes import caption, position_name, random_scene, vocabulary_texts
    from epic.models.factory import build_tiny_llava_with_processor
    from epic.models.tiny import TinyLlavaSpec

    config = SynthConfig(image_size=48, caption_style="places")
    scene = random_scene(np.random.default_rng(4), config)
    text = caption(scene, config.grid, "places")
    first = scene.shapes[0]
    assert text.startswith(f"{position_name(first.row, first.column, 3)}: {first.name}") and text.endswith(".")
    assert text.count(";") == len(scene.shapes) - 1
    spec = TinyLlavaSpec(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=2)
    _, processor = build_tiny_llava_with_processor(vocabulary_texts(config), spec)
    tokenizer = processor.tokenizer
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
    assert ";" not in " ".join(vocabulary_texts(SynthConfig()))  # the objects style keeps its vocabulary
    with pytest.raises(ValueError, match="caption_style"):
        SynthConfig(caption_style="poem")


def test_chance_accuracy_is_one_over_each_types_answer_count():
    assert chance_accuracy(["colour"]) == pytest.approx(100 / len(COLOURS))
    assert chance_accuracy(QUESTION_TYPES) == pytest.approx(100 * (1 / 6 + 1 / 4 + 1 / 4 + 1 / 2 + 1 / 2 + 1 / 4) / 6)
    assert chance_accuracy([]) is None and chance_accuracy(["colour", "weather"]) is None
