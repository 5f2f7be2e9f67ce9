"""The lmms-eval plugin end to end, offline: a local task made from the built-in data, run by simple_evaluate."""

from __future__ import annotations

import json

import pytest

from epic.data.shapes import SynthConfig, vocabulary_texts, write_synthetic
from epic.models.factory import build_tiny_llava_with_processor, save_llava
from epic.models.tiny import TinyLlavaSpec

UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact": float(results[0].strip().lower() == doc["answer"].lower())}
"""


def write_task(folder, rows) -> None:
    from datasets import Dataset, Features, Image, Value

    features = Features({"image": Image(), "question": Value("string"), "answer": Value("string")})
    Dataset.from_list(rows, features=features).to_parquet(str(folder / "test.parquet"))
    (folder / "utils.py").write_text(UTILS)
    (folder / "epic_shapes.yaml").write_text(
        "task: epic_shapes\n"
        "dataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'test.parquet'}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 4\n"
        "process_results: !function utils.process_results\n"
        "metric_list:\n  - metric: exact\n    aggregation: mean\n    higher_is_better: true\n"
    )


def test_simple_evaluate_runs_the_epic_model(tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    write_synthetic(tmp_path / "shapes", SynthConfig(n_train=4, n_val=2, n_test=6, n_captions=2, seed=1))
    rows = json.loads((tmp_path / "shapes" / "test.json").read_text())
    task = tmp_path / "task"
    task.mkdir()
    write_task(
        task,
        [
            {
                "image": str(tmp_path / "shapes" / "images" / row["image"]),
                "question": row["question"],
                "answer": row["answer"],
            }
            for row in rows
        ],
    )
    model, processor = build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), TinyLlavaSpec())
    save_llava(model, processor, tmp_path / "model", "vicuna_v1")
    results = simple_evaluate(
        model="epic",
        model_args=f"pretrained={tmp_path / 'model'},method=dart,tokens=7",
        tasks=["epic_shapes"],
        task_manager=TaskManager("WARNING", include_path=str(task)),
        batch_size=4,
    )
    metrics = results["results"]["epic_shapes"]
    assert 0.0 <= metrics["exact,none"] <= 1.0
    assert results["n-samples"]["epic_shapes"]["effective"] == len(rows)
    assert len(results["samples"]["epic_shapes"]) == len(rows)
