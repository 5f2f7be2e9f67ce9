"""The demo's plumbing: data preparation, the base model cache, stale results, subprocess failures, the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from epic.demo import demo_config, pipeline
from epic.demo.pipeline import BASE_KEY_FILE, Job, comparison_jobs, prepare_data, run_jobs


def small_config(**overrides):
    return demo_config(quick=True, **({"n_train": 20, "n_captions": 6, "n_test": 10} | overrides))


def test_prepare_data_writes_the_mix_and_the_blank_control(tmp_path):
    config = small_config(multi_turn=True, question_types=("colour", "shape"))
    data = prepare_data(config, tmp_path)
    mix = json.loads((data / "base_train.json").read_text())
    captions = [row for row in mix if row["id"].startswith("caption-")]
    assert len(captions) == 6 and len(mix) > 6
    questions = [row for row in mix if not row["id"].startswith("caption-")]
    assert all(len(row["conversations"]) == 4 for row in questions[:-1])  # one conversation per scene
    blank = json.loads((data / "blank.json").read_text())
    test = json.loads((data / "test.json").read_text())
    assert [row["id"] for row in blank] == [row["id"] for row in test]
    assert {row["image"] for row in blank} == {"blank.png"} and (data / "images" / "blank.png").is_file()
    stamp = (data / "test.json").stat().st_mtime_ns
    prepare_data(config, tmp_path)  # same settings: nothing is drawn again
    assert (data / "test.json").stat().st_mtime_ns == stamp
    prepare_data(small_config(multi_turn=True, question_types=("colour", "shape"), n_test=12), tmp_path)  # drawn again
    assert len(json.loads((data / "test.json").read_text())) == 12


def test_failed_job_stops_with_its_log(tmp_path):
    failing = Job("broken", [sys.executable, "-c", "print('the cause'); raise SystemExit(3)"], tmp_path / "never")
    with pytest.raises(RuntimeError, match=r"broken failed \(exit 3\)[\s\S]*the cause"):
        run_jobs([failing], 2, tmp_path / "logs", "test")


def test_finished_jobs_are_skipped_and_a_job_must_produce_its_output(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    run_jobs([Job("done", [sys.executable, "-c", "raise SystemExit(1)"], done)], 1, tmp_path / "logs", "test")
    silent = Job("silent", [sys.executable, "-c", "pass"], tmp_path / "missing")
    with pytest.raises(RuntimeError, match="silent failed"):
        run_jobs([silent], 1, tmp_path / "logs", "test")


def test_cached_base_is_reused_only_with_the_same_settings(tmp_path, monkeypatch):
    config = small_config()
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    (base / BASE_KEY_FILE).write_text(json.dumps(config.base_key()))
    monkeypatch.setattr(pipeline, "run_jobs", lambda *a, **k: pytest.fail("the cached base was trained again"))
    assert pipeline.train_base(config, tmp_path / "data", tmp_path) == base
    trained = []
    monkeypatch.setattr(pipeline, "run_jobs", lambda jobs, *a, **k: trained.extend(jobs))
    with pytest.raises(FileNotFoundError):  # the stub trains nothing, so there is no final folder to move
        pipeline.train_base(
            config.__class__(**(config.as_dict() | {"base_steps": 7})), prepare_data(config, tmp_path), tmp_path
        )
    assert trained and "--max_steps" in trained[0].command and "7" in trained[0].command


def test_comparisons_share_steps_data_and_learning_rate(tmp_path):
    config = small_config(fine_tune_seeds=2)
    jobs = comparison_jobs(config, tmp_path / "data", tmp_path, tmp_path / "models" / "base")
    assert [job.name for job in jobs] == [
        "sft",
        "direct",
        "tcd",
        "lcd",
        "sft-seed2",
        "direct-seed2",
        "tcd-seed2",
        "lcd-seed2",
    ]

    def option(job: Job, key: str) -> str | None:
        return job.command[job.command.index(key) + 1] if key in job.command else None

    for job in jobs:
        assert option(job, "--max_steps") == str(config.extra_steps)
        assert option(job, "--learning_rate") == str(config.extra_lr)
        assert option(job, "--train_file") == str(tmp_path / "data" / "train.json")
    by_name = {job.name: job for job in jobs}
    assert option(by_name["sft"], "--tokens") is None and option(by_name["sft"], "--mode") == "sft"
    assert option(by_name["direct"], "--tokens") == str(config.target_tokens)
    assert option(by_name["tcd"], "--mode") == "tcd" and option(by_name["lcd"], "--mode") == "lcd"
    assert option(by_name["tcd-seed2"], "--seed") == str(config.seed + 1)


def test_results_of_another_configuration_are_forgotten(tmp_path):
    config = small_config()
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    (base / BASE_KEY_FILE).write_text(json.dumps(config.base_key()))
    for folder in ("models/tcd", "runs/tcd", "eval/tcd"):
        (tmp_path / folder).mkdir(parents=True)
    pipeline._forget_stale_comparisons(config, tmp_path, base)  # no record yet: nothing can be trusted
    assert not (tmp_path / "models" / "tcd").exists() and not (tmp_path / "eval").exists()
    (tmp_path / "models" / "tcd").mkdir()
    pipeline._forget_stale_comparisons(config, tmp_path, base)  # same settings: kept
    assert (tmp_path / "models" / "tcd").exists() and base.exists()
    pipeline._forget_stale_comparisons(config.__class__(**(config.as_dict() | {"extra_steps": 3})), tmp_path, base)
    assert not (tmp_path / "models" / "tcd").exists() and base.exists()


def test_quick_demo_end_to_end(tmp_path):
    """`epic demo --quick` as a user runs it: every stage, the report with its tables and pictures, then a second
    run that reuses everything."""
    import subprocess

    out = tmp_path / "demo"
    command = [sys.executable, "-m", "epic.cli", "demo", "--quick", "--out", str(out)]
    first = subprocess.run(
        command, capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )
    assert first.returncode == 0, first.stderr[-3000:]
    report = (out / "report.md").read_text()
    for heading in (
        "## Headline",
        "Table 1 in miniature",
        "Generalisation",
        "what there was to teach",
        "Cost of each budget",
    ):
        assert heading in report
    assert "blank images" in report and (out / "accuracy.png").is_file()
    assert list(out.glob("kept-tcd-*.png")) and list(out.glob("kept-base-*.png"))
    for name in ("base", "sft", "direct", "tcd", "lcd"):
        assert (out / "models" / name / "model.safetensors").is_file()
        grid = json.loads((out / "eval" / name / "grid.json").read_text())
        assert {row["method"] for row in grid} == {"none", "dart", "fastv", "random"}
    kd = json.loads((out / "models" / "tcd" / "log_history.json").read_text())
    assert any("kd_loss" in entry for entry in kd)
    second = subprocess.run(command, capture_output=True, text=True)
    assert second.returncode == 0 and "reusing" in second.stdout
    assert Path(out / "report.md").is_file()
    kd_run = subprocess.run([*command, "--kd"], capture_output=True, text=True)  # the base model is the teacher
    assert kd_run.returncode == 0 and "reusing" in kd_run.stdout, kd_run.stderr[-3000:]
    kd_report = (out / "kd" / "kd-report.md").read_text()
    assert "PT-SFT (no KD)" in kd_report and "DPT-SFT-DFT" in kd_report and "rel_loss" in kd_report
    dft = json.loads((out / "kd" / "runs" / "dpt-sft-dft-dft" / "final" / "log_history.json").read_text())
    assert any("res_loss" in entry for entry in dft)


def test_evaluation_grid_per_model_headline_only_for_later_seeds_and_a_blank_control(tmp_path):
    from epic.demo.pipeline import eval_jobs

    config = small_config(fine_tune_seeds=2)
    models = {"base": tmp_path / "base", "tcd": tmp_path / "tcd", "tcd-seed2": tmp_path / "tcd2"}
    jobs = {job.name: job for job in eval_jobs(config, tmp_path / "data", tmp_path, models)}
    assert list(jobs) == ["eval-base", "eval-tcd", "eval-tcd-seed2", "eval-base-blank"]

    def option(job, flag):
        return job.command[job.command.index(flag) + 1] if flag in job.command else None

    assert option(jobs["eval-tcd"], "--methods") == "dart,fastv,random"
    assert option(jobs["eval-tcd"], "--tokens") == ",".join(str(b) for b in config.budgets)
    assert option(jobs["eval-tcd-seed2"], "--tokens") == f"{config.image_tokens},{config.target_tokens}"
    blank = jobs["eval-base-blank"]
    assert option(blank, "--data").endswith("blank.json") and option(blank, "--methods") is None
    assert blank.produces.name == "metrics.json" and jobs["eval-base"].produces.name == "grid.json"
    assert option(blank, "--images") == str(tmp_path / "data" / "images")
