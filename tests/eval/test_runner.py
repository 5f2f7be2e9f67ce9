"""The evaluation runner: batched left-padded generation equals one by one, compression applied, resume."""

from __future__ import annotations

import json

import pytest

from epic.cli import main
from epic.data.shapes import SynthConfig, vocabulary_texts, write_synthetic
from epic.data.templates import get_template
from epic.eval.runner import CompressionSettings, generate_answers, load_items, read_predictions
from epic.eval.tasks import score_shapes
from epic.models.factory import build_tiny_llava_with_processor, save_llava
from epic.models.tiny import TinyLlavaSpec


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    write_synthetic(folder / "shapes", SynthConfig(n_train=10, n_val=5, n_test=15, n_captions=2, seed=2))
    model, processor = build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), TinyLlavaSpec())
    save_llava(model, processor, folder / "model", "vicuna_v1")
    items = load_items(folder / "shapes" / "test.json", folder / "shapes" / "images")
    return folder, model, processor, items


def test_batched_equals_one_by_one_and_compression_applies(setup, tmp_path):
    _, model, processor, items = setup
    template = get_template("vicuna_v1")
    batched = generate_answers(model, processor, template, items, tmp_path / "a.jsonl", batch_size=8, progress=False)
    single = generate_answers(model, processor, template, items, tmp_path / "b.jsonl", batch_size=1, progress=False)
    assert batched == single and len(batched) == len(items)
    compressed = CompressionSettings("dart", tokens=4)
    kept = generate_answers(model, processor, template, items, tmp_path / "c.jsonl", compressed, progress=False)
    assert kept.keys() == batched.keys()
    metrics = score_shapes(items, batched)
    assert 0.0 <= metrics["overall"] <= 100.0 and "pope" in metrics


def test_an_interrupted_evaluation_resumes(setup, tmp_path):
    _, model, processor, items = setup
    template = get_template("vicuna_v1")
    path = tmp_path / "predictions.jsonl"
    calls = []
    original = model.generate

    def interrupted_after_two_batches(**kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    model.generate = interrupted_after_two_batches
    try:
        with pytest.raises(KeyboardInterrupt):
            generate_answers(model, processor, template, items, path, batch_size=4, progress=False)
    finally:
        del model.generate
    done = read_predictions(path)
    assert len(done) == 8
    with open(path, "a") as out:
        out.write('{"id": "torn')  # a line cut by the interruption
    calls.clear()
    model.generate = lambda **kwargs: calls.append(kwargs["input_ids"].shape[0]) or original(**kwargs)
    try:
        predictions = generate_answers(model, processor, template, items, path, batch_size=4, progress=False)
    finally:
        del model.generate
    assert sum(calls) == len(items) - 8
    assert all(predictions[key] == value for key, value in done.items())
    assert len(read_predictions(path)) == len(items)


def test_eval_command(setup, tmp_path, capsys):
    folder, *_ = setup
    code = main(
        [
            "eval",
            str(folder / "model"),
            "--data",
            str(folder / "shapes" / "test.json"),
            "--images",
            str(folder / "shapes" / "images"),
            "--method",
            "fastv",
            "--tokens",
            "7",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"overall", "colour", "count", "exists", "relation", "choice", "pope"} <= metrics.keys()
    assert "overall" in capsys.readouterr().out


def test_items_need_an_answer(tmp_path):
    (tmp_path / "d.json").write_text(
        json.dumps(
            [
                {
                    "id": "x",
                    "conversations": [
                        {"from": "human", "value": "hi"},
                        {"from": "gpt", "value": "yes"},
                        {"from": "human", "value": "and?"},
                    ],
                }
            ]
        )
    )
    with pytest.raises(ValueError, match=r"no assistant turn|ends on its answer"):
        load_items(tmp_path / "d.json", None)


def test_grid_of_methods_and_budgets(setup, tmp_path):
    folder, *_ = setup
    argv = [
        "eval",
        str(folder / "model"),
        "--data",
        str(folder / "shapes" / "test.json"),
        "--images",
        str(folder / "shapes" / "images"),
        "--methods",
        "dart,divprune@0",
        "--tokens",
        "64,16,7",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    table = (tmp_path / "grid.md").read_text().splitlines()
    assert table[0] == "| method | 64 | 16 | 7 |" and table[2].startswith("| dart |") and len(table) == 4
    rows = json.loads((tmp_path / "grid.json").read_text())
    assert [(row["method"], row["tokens"]) for row in rows] == [
        ("none", 64),
        ("dart", 16),
        ("dart", 7),
        ("divprune@0", 16),
        ("divprune@0", 7),
    ]
    assert "'layer': 2" in str(rows[1]["settings"]) and "'layer': 0" in str(rows[3]["settings"])  # name@K: at K
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "dart-7.jsonl").is_file()
    before = {path.name: path.read_text() for path in tmp_path.glob("*.jsonl")}
    assert main(argv) == 0  # a rerun resumes from every predictions file: nothing left to generate
    assert {path.name: path.read_text() for path in tmp_path.glob("*.jsonl")} == before


def test_a_model_folder_that_is_not_llava_is_refused(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "llama")
    assert main(["eval", str(tmp_path / "llama"), "--data", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"epic eval: {tmp_path / 'llama'} holds a 'llama' model, not a LLaVA model (model_type 'llava')"
    )


def test_answers_stop_where_the_template_ends_a_reply(setup, tmp_path, monkeypatch):
    """A ChatML model ends its reply with <|im_end|>, not </s>: generation must stop there, or the answer runs on."""
    _, model, processor, items = setup
    seen = {}
    generate = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate_answers(model, processor, get_template("chatml"), items[:2], tmp_path / "p.jsonl", max_new_tokens=2)
    tokenizer = processor.tokenizer
    assert set(seen["eos_token_id"]) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
