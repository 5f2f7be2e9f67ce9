"""The demo's training stages: data preparation, the stage-1 cache, the arms sharing everything but their
compression, and stale results of other settings forgotten."""

from __future__ import annotations

import json

import pytest

from epic.demo import demo_config, training
from epic.demo.jobs import Job
from epic.demo.training import STAGE1_KEY_FILE, forget_stale_runs, prepare_data, stage2_jobs


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


def test_cached_stage1_is_reused_only_with_the_same_settings(tmp_path, monkeypatch):
    config = small_config()
    stage1 = tmp_path / "models" / "stage1"
    stage1.mkdir(parents=True)
    (stage1 / STAGE1_KEY_FILE).write_text(json.dumps(config.stage1_key()))
    monkeypatch.setattr(training, "run_jobs", lambda *a, **k: pytest.fail("the cached stage 1 was trained again"))
    assert training.train_stage1(config, tmp_path / "data", tmp_path) == stage1
    trained = []
    monkeypatch.setattr(training, "run_jobs", lambda jobs, *a, **k: trained.extend(jobs))
    with pytest.raises(FileNotFoundError):  # the stub trains nothing, so there is no final folder to move
        training.train_stage1(
            config.__class__(**(config.as_dict() | {"stage1_steps": 7})), prepare_data(config, tmp_path), tmp_path
        )
    assert option(trained[0], "--max_steps") == "7"
    assert option(trained[0], "--train_file").endswith("stage1/mix.json")
    assert option(trained[0], "--freeze_vision_tower") == "False"


def test_one_process_stage1_is_not_launched_as_ddp(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(training, "run_jobs", lambda jobs, *a, **k: trained.extend(jobs))
    for workers in (1, 2):
        config = small_config(workers=workers, stage1_steps=3 + workers)
        with pytest.raises(FileNotFoundError):
            training.train_stage1(config, prepare_data(config, tmp_path), tmp_path)
    one, two = trained
    assert "torch.distributed.run" not in one.command and "--ddp_backend" not in one.command
    assert option(one, "--per_device_train_batch_size") == str(small_config().batch_size)
    assert "torch.distributed.run" in two.command and option(two, "--ddp_backend") == "gloo"


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
    forget_stale_runs(config, tmp_path, stage1)  # no record yet: nothing can be trusted
    assert not (tmp_path / "models" / "tcd").exists() and not (tmp_path / "eval").exists()
    (tmp_path / "models" / "tcd").mkdir()
    forget_stale_runs(config, tmp_path, stage1)  # same settings: kept
    assert (tmp_path / "models" / "tcd").exists() and stage1.exists()
    forget_stale_runs(config.__class__(**(config.as_dict() | {"hold": 0.5})), tmp_path, stage1)
    assert not (tmp_path / "models" / "tcd").exists() and stage1.exists()
