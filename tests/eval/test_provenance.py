"""A resumed evaluation reuses only its own answers: the settings are recorded beside the predictions, and a run with
other settings into the same folder is refused with the setting that differs named, or restarted on request."""

from __future__ import annotations

import json

import pytest
import torch

from epic.cli import main
from epic.data.shapes import SynthConfig, vocabulary_texts, write_synthetic
from epic.eval.provenance import StaleResults, claim_predictions, weights_fingerprint
from epic.models.factory import build_tiny_llava_with_processor, save_llava
from epic.models.tiny import TinyLlavaSpec


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("provenance")
    write_synthetic(root / "shapes", SynthConfig(n_train=4, n_val=2, n_test=12, n_captions=2, seed=3))
    rows = json.loads((root / "shapes" / "test.json").read_text())
    (root / "fewer.json").write_text(json.dumps(rows[:6]))
    for seed in (0, 1):  # two models of the same shape and vocabulary: only their weights differ
        model, processor = build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), TinyLlavaSpec(), seed=seed)
        save_llava(model, processor, root / f"model{seed}", "vicuna_v1")
    return root


def argv(root, out, *extra: str, model: str = "model0", data: str = "shapes/test.json") -> list[str]:
    return [
        "eval",
        str(root / model),
        "--data",
        str(root / data),
        "--images",
        str(root / "shapes" / "images"),
        "--out",
        str(out),
        "--max-new-tokens",
        "2",
        *extra,
    ]


FIRST = ["--method", "dart", "--tokens", "4"]
CHANGES = {  # another run into the same --out: what changes, and the recorded setting that must be named
    "another model": ({"model": "model1"}, FIRST, "weights"),
    "no compression": ({}, ["--method", "none"], "compression"),
    "another method": ({}, ["--method", "random", "--tokens", "4"], "compression"),
    "another budget": ({}, ["--method", "dart", "--tokens", "16"], "compression"),
    "another layer": ({}, [*FIRST, "--layer", "1"], "compression"),
    "another template": ({}, [*FIRST, "--template", "chatml"], "template"),
    "other data": ({"data": "fewer.json"}, FIRST, "items"),
    "longer answers": ({}, [*FIRST, "--max-new-tokens", "3"], "max_new_tokens"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_another_runs_answers_are_never_reported_as_this_ones(folders, tmp_path, capsys, change):
    where, second, setting = CHANGES[change]
    assert main(argv(folders, tmp_path, *FIRST)) == 0
    first_metrics = (tmp_path / "metrics.json").read_text()
    capsys.readouterr()
    assert main(argv(folders, tmp_path, *second, **where)) == 2
    captured = capsys.readouterr()
    message = captured.err.strip().splitlines()[-1]  # after the weights' loading bar
    assert message.startswith("epic eval: ") and "holds another run's answers" in message
    assert f"{setting} " in message and "--restart" in message and "overall" not in captured.out
    assert (tmp_path / "metrics.json").read_text() == first_metrics


def test_restart_discards_another_runs_answers_and_metrics_name_their_settings(folders, tmp_path):
    assert main(argv(folders, tmp_path, *FIRST)) == 0
    assert main(argv(folders, tmp_path, "--method", "random", "--tokens", "4", "--restart")) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["settings"]["compression"]["method"] == "random"
    assert metrics["settings"]["items"].startswith("12 items")
    assert main(argv(folders, tmp_path, "--method", "random", "--tokens", "4")) == 0  # same settings: resumes


def test_the_default_evaluation_compresses_to_a_ninth_of_the_image(folders, tmp_path, capsys):
    assert main(argv(folders, tmp_path)) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "dart, 7 of 64 visual tokens per image kept from layer 2" in header
    settings = json.loads((tmp_path / "metrics.json").read_text())["settings"]
    assert settings["compression"] == {"method": "dart", "tokens": 7, "ratio": None, "layer": 2, "seed": 0}


def test_answers_without_a_settings_record_are_refused(tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"id": "a", "prediction": "red"}\n')
    with pytest.raises(StaleResults, match="no record of the settings"):
        claim_predictions(predictions, {"model": "m"})
    claim_predictions(predictions, {"model": "m"}, restart=True)
    assert not predictions.exists() and json.loads(predictions.with_suffix(".settings.json").read_text()) == {
        "model": "m"
    }


def test_the_weights_fingerprint_follows_the_weights_not_the_object():
    model, _ = build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), TinyLlavaSpec())
    before = weights_fingerprint(model)
    copy, _ = build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), TinyLlavaSpec())
    assert weights_fingerprint(copy) == before
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1e-3 * torch.randn_like(parameter))  # a training step moves every weight
    assert weights_fingerprint(model) != before
