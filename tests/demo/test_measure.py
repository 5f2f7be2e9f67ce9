"""The demo's measuring stages: which evaluations run, and the budget exposure each first-seed arm is reported with,
replayed from that arm's own `epic train` options."""

from __future__ import annotations

from epic.demo import demo_config
from epic.demo.measure import eval_jobs, exposures
from tests.demo.test_training import option, small_config


def test_evaluation_grid_headline_budgets_for_later_seeds_and_the_controls(tmp_path):
    config = small_config(seeds=2)
    models = {"stage1": tmp_path / "s1", "sft": tmp_path / "sft", "tcd": tmp_path / "tcd", "tcd-seed2": tmp_path / "t2"}
    jobs = {job.name: job for job in eval_jobs(config, tmp_path / "data", tmp_path, models)}
    assert list(jobs) == ["eval-stage1", "eval-sft", "eval-tcd", "eval-tcd-seed2", "eval-stage1-own", "eval-sft-blank"]
    assert option(jobs["eval-tcd"], "--methods") == "dart,fastv,random,pdrop,divprune@0,dart_pre@0,visionzip@0"
    assert option(jobs["eval-tcd"], "--tokens") == ",".join(str(b) for b in config.budgets)
    headline = [config.image_tokens, *config.headline_budgets]
    assert option(jobs["eval-tcd-seed2"], "--tokens") == ",".join(str(b) for b in headline)
    own = jobs["eval-stage1-own"]
    assert option(own, "--data").endswith("stage1/test.json") and option(own, "--methods") is None
    assert option(own, "--images") == str(tmp_path / "data" / "stage1" / "images")
    blank = jobs["eval-sft-blank"]
    assert option(blank, "--data").endswith("blank.json") and blank.produces.name == "metrics.json"


def test_exposure_is_measured_for_each_first_seed_arm_from_its_own_schedule(tmp_path):
    config = demo_config(seeds=2, stage2_steps=40)
    seen = exposures(config, tmp_path / "data", tmp_path, tmp_path / "models" / "stage1")
    assert list(seen) == ["sft", "direct", "tcd", "tcd-nokd", "lcd"]  # later seeds share their first seed's options
    assert (seen["sft"]["steps_at_budget"], seen["sft"]["mean_kept_tokens"]) == (0, config.image_tokens)
    assert (seen["direct"]["steps_at_budget"], seen["direct"]["lr_share_at_budget"]) == (40, 1.0)
    held = round(40 * config.hold)  # TCD reaches the target at 1 - hold of stage 2 and trains there after
    assert seen["tcd"]["steps_at_budget"] == seen["tcd-nokd"]["steps_at_budget"] == held
    assert seen["tcd"]["first_step_at_budget"] == 40 - held and len(seen["tcd"]["kept_tokens"]) == 40
