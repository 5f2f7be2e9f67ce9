"""The demo's plumbing: data preparation, the stage-1 cache, the arms, stale results, subprocess failures, the
report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from epic.demo import demo_config, pipeline
from epic.demo.pipeline import STAGE1_KEY_FILE, Job, eval_jobs, prepare_data, run_jobs, stage2_jobs


def small_config(**overrides):
    sizes = {"n_train": 20, "n_test": 10, "stage1_questions": 8, "stage1_captions": 6, "stage1_test": 4}
    return demo_config(quick=True, **(sizes | overrides))


def option(job: Job, key: str) -> str | None:
    return job.command[job.command.index(key) + 1] if key in job.command else None


def test_prepare_data_writes_both_stages_and_the_blank_control(tmp_path):
    config = small_config(multi_turn=True, question_types=("colour", "count"))
    data = prepare_data(config, tmp_path)
    mix = json.loads((data / "stage1" / "mix.json").read_text())
    captions = [row for row in mix if row["id"].startswith("caption-")]
    assert len(captions) == 6 and len(mix) == 14
    assert {row["type"] for row in mix if row not in captions} == {"shape"}
    assert all(":" in row["conversations"][1]["value"] for row in captions)  # "top left: red circle; ..."
    stage2 = json.loads((data / "train.json").read_text())
    assert all(len(row["conversations"]) == 4 for row in stage2[:-1])  # one conversation per scene
    blank = json.loads((data / "blank.json").read_text())
    test = json.loads((data / "test.json").read_text())
    assert [row["id"] for row in blank] == [row["id"] for row in test]
    assert {row["image"] for row in blank} == {"blank.png"} and (data / "images" / "blank.png").is_file()
    stamp = (data / "test.json").stat().st_mtime_ns
    stage1_stamp = (data / "stage1" / "mix.json").stat().st_mtime_ns
    prepare_data(config, tmp_path)  # same settings: nothing is drawn again
    assert (data / "test.json").stat().st_mtime_ns == stamp
    prepare_data(small_config(multi_turn=True, question_types=("colour", "count"), n_test=12), tmp_path)  # drawn again
    assert len(json.loads((data / "test.json").read_text())) == 12
    assert (data / "stage1" / "mix.json").stat().st_mtime_ns == stage1_stamp  # stage 1's own set is kept


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


def test_cached_stage1_is_reused_only_with_the_same_settings(tmp_path, monkeypatch):
    config = small_config()
    stage1 = tmp_path / "models" / "stage1"
    stage1.mkdir(parents=True)
    (stage1 / STAGE1_KEY_FILE).write_text(json.dumps(config.stage1_key()))
    monkeypatch.setattr(pipeline, "run_jobs", lambda *a, **k: pytest.fail("the cached stage 1 was trained again"))
    assert pipeline.train_stage1(config, tmp_path / "data", tmp_path) == stage1
    trained = []
    monkeypatch.setattr(pipeline, "run_jobs", lambda jobs, *a, **k: trained.extend(jobs))
    with pytest.raises(FileNotFoundError):  # the stub trains nothing, so there is no final folder to move
        pipeline.train_stage1(
            config.__class__(**(config.as_dict() | {"stage1_steps": 7})), prepare_data(config, tmp_path), tmp_path
        )
    assert option(trained[0], "--max_steps") == "7"
    assert option(trained[0], "--train_file").endswith("stage1/mix.json")
    assert option(trained[0], "--freeze_vision_tower") == "False"


def test_arms_share_the_stage1_model_steps_data_rates_and_seeds(tmp_path):
    config = small_config(seeds=3)
    jobs = stage2_jobs(config, tmp_path / "data", tmp_path, tmp_path / "models" / "stage1")
    assert [job.name for job in jobs] == [
        "sft",
        "direct",
        "tcd",
        "tcd-nokd",
        "lcd",
        "direct-seed2",
        "tcd-seed2",
        "tcd-nokd-seed2",
        "direct-seed3",
        "tcd-seed3",
        "tcd-nokd-seed3",
    ]
    for job in jobs:
        assert option(job, "--model") == str(tmp_path / "models" / "stage1")
        assert option(job, "--max_steps") == str(config.stage2_steps)
        assert option(job, "--learning_rate") == str(config.stage2_lr)
        assert option(job, "--lr_scheduler_type") == config.stage2_schedule
        assert option(job, "--train_file") == str(tmp_path / "data" / "train.json")
    by_name = {job.name: job for job in jobs}
    assert option(by_name["sft"], "--tokens") is None and option(by_name["sft"], "--mode") == "sft"
    assert option(by_name["direct"], "--tokens") == str(config.target_tokens)
    tcd, nokd = by_name["tcd-seed2"], by_name["tcd-nokd-seed2"]
    assert option(tcd, "--seed") == option(nokd, "--compression_seed") == str(config.seed + 1)
    assert option(nokd, "--alpha") == "0.0" and option(tcd, "--alpha") is None
    same = [arg.replace("tcd-nokd-seed2", "tcd-seed2") for arg in nokd.command]
    same[same.index("--alpha") : same.index("--alpha") + 2] = []
    assert same == tcd.command  # the same draws: only alpha (and the folder) differ
    for name in ("tcd", "lcd"):
        assert option(by_name[name], "--schedule_hold") == str(config.hold)
    assert float(option(by_name["tcd"], "--r_min_end")) == 1 - config.target_tokens / config.image_tokens


def test_results_of_another_configuration_are_forgotten(tmp_path):
    config = small_config()
    stage1 = tmp_path / "models" / "stage1"
    stage1.mkdir(parents=True)
    (stage1 / STAGE1_KEY_FILE).write_text(json.dumps(config.stage1_key()))
    for folder in ("models/tcd", "runs/tcd", "eval/tcd"):
        (tmp_path / folder).mkdir(parents=True)
    pipeline._forget_stale_runs(config, tmp_path, stage1)  # no record yet: nothing can be trusted
    assert not (tmp_path / "models" / "tcd").exists() and not (tmp_path / "eval").exists()
    (tmp_path / "models" / "tcd").mkdir()
    pipeline._forget_stale_runs(config, tmp_path, stage1)  # same settings: kept
    assert (tmp_path / "models" / "tcd").exists() and stage1.exists()
    pipeline._forget_stale_runs(config.__class__(**(config.as_dict() | {"hold": 0.5})), tmp_path, stage1)
    assert not (tmp_path / "models" / "tcd").exists() and stage1.exists()


def test_evaluation_grid_headline_budgets_for_later_seeds_and_the_controls(tmp_path):
    config = small_config(seeds=2)
    models = {"stage1": tmp_path / "s1", "sft": tmp_path / "sft", "tcd": tmp_path / "tcd", "tcd-seed2": tmp_path / "t2"}
    jobs = {job.name: job for job in eval_jobs(config, tmp_path / "data", tmp_path, models)}
    assert list(jobs) == ["eval-stage1", "eval-sft", "eval-tcd", "eval-tcd-seed2", "eval-stage1-own", "eval-sft-blank"]
    assert option(jobs["eval-tcd"], "--methods") == "dart,fastv,random"
    assert option(jobs["eval-tcd"], "--tokens") == ",".join(str(b) for b in config.budgets)
    headline = [config.image_tokens, *config.headline_budgets]
    assert option(jobs["eval-tcd-seed2"], "--tokens") == ",".join(str(b) for b in headline)
    own = jobs["eval-stage1-own"]
    assert option(own, "--data").endswith("stage1/test.json") and option(own, "--methods") is None
    assert option(own, "--images") == str(tmp_path / "data" / "stage1" / "images")
    blank = jobs["eval-sft-blank"]
    assert option(blank, "--data").endswith("blank.json") and blank.produces.name == "metrics.json"


def test_quick_demo_end_to_end(tmp_path):
    """`epic demo --quick` as a user runs it: every stage, the report with its tables and pictures, then a second
    run that reuses everything, then `--kd` on the `--from-base` model."""
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "epic.cli", "demo", "--quick", "--out", str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, env=environment)
    assert first.returncode == 0, first.stderr[-3000:]
    report = (out / "report.md").read_text()
    for heading in (
        "## Headline",
        "Budget exposure",
        "Accuracy at every budget",
        "Generalisation",
        "what there was to teach",
        "Cost of each budget",
    ):
        assert heading in report
    assert "blank images" in report and "its own questions" in report and "alpha = 0 ablation" in report
    assert report.startswith("# epic demo: the EPIC experiment in miniature (--quick)") and "not a result" in report
    assert "not a result" in first.stdout and "colour questions (chance 16.7%)" in report
    assert f"to {out / 'models' / 'stage1'}, where the stage-1 model is" in (out / "logs" / "stage1.log").read_text()
    assert (out / "accuracy.png").is_file() and (out / "headline.png").is_file()
    assert list(out.glob("kept-tcd-*.png")) and list(out.glob("kept-sft-*.png"))
    for name in ("stage1", "sft", "direct", "tcd", "tcd-nokd", "lcd"):
        assert (out / "models" / name / "model.safetensors").is_file()
        grid = json.loads((out / "eval" / name / "grid.json").read_text())
        assert {row["method"] for row in grid} == {"none", "dart", "fastv", "random"}
    tcd = json.loads((out / "models" / "tcd" / "log_history.json").read_text())
    nokd = json.loads((out / "models" / "tcd-nokd" / "log_history.json").read_text())
    assert any("kd_loss" in entry for entry in tcd) and not any("kd_loss" in entry for entry in nokd)
    assert [e["student_ratio"] for e in tcd if "student_ratio" in e] == [
        e["student_ratio"] for e in nokd if "student_ratio" in e
    ]  # the same draws
    second = subprocess.run(command, capture_output=True, text=True, env=environment)
    assert second.returncode == 0 and "reusing" in second.stdout
    kd_run = subprocess.run([*command, "--kd"], capture_output=True, text=True, env=environment)
    assert kd_run.returncode == 0, kd_run.stderr[-3000:]
    kd_report = (out / "kd" / "kd-report.md").read_text()
    assert "PT-SFT (no KD)" in kd_report and "DPT-SFT-DFT" in kd_report and "rel_loss" in kd_report
    assert "(--quick)" in kd_report.splitlines()[0] and "not a result" in kd_report
    assert f"to {out / 'models' / 'base'}, where" in (out / "logs" / "base.log").read_text()
    assert (out / "models" / "base" / STAGE1_KEY_FILE).is_file()  # the teacher: the --from-base model
    dft = json.loads((out / "kd" / "runs" / "dpt-sft-dft-dft" / "final" / "log_history.json").read_text())
    assert any("res_loss" in entry for entry in dft)


def test_a_job_showing_progress_keeps_its_errors_for_the_failure_message(tmp_path, capfd):
    noisy = [sys.executable, "-c", "import sys; sys.stderr.write('step 3/9\\rboom: the cause\\n'); sys.exit(2)"]
    with pytest.raises(RuntimeError, match=r"loud failed \(exit 2\).*loud\.stderr\.log[\s\S]*boom: the cause"):
        run_jobs([Job("loud", noisy, tmp_path / "never", show_progress=True)], 1, tmp_path / "logs", "test")
    assert "boom: the cause" in capfd.readouterr().err  # the terminal saw it too


def test_one_process_stage1_is_not_launched_as_ddp(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(pipeline, "run_jobs", lambda jobs, *a, **k: trained.extend(jobs))
    for workers in (1, 2):
        config = small_config(workers=workers, stage1_steps=3 + workers)
        with pytest.raises(FileNotFoundError):
            pipeline.train_stage1(config, prepare_data(config, tmp_path), tmp_path)
    one, two = trained
    assert "torch.distributed.run" not in one.command and "--ddp_backend" not in one.command
    assert option(one, "--per_device_train_batch_size") == str(small_config().batch_size)
    assert "torch.distributed.run" in two.command and option(two, "--ddp_backend") == "gloo"
