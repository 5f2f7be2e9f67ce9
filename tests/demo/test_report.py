"""The report renders from the stages' files alone: its tables hold exactly their numbers, every seed where every
seed was evaluated and only the first elsewhere, and a missing file stops it before anything is written."""

from __future__ import annotations

import itertools
import json

import pytest

from epic.demo import demo_config
from epic.demo.config import arm_runs
from epic.demo.report import checks, headline, write_report
from epic.demo.results import quick_banner
from tests.demo.report_checks import check_report


def write_grid(out, name, rows):
    folder = out / "eval" / name
    folder.mkdir(parents=True)
    grid = [{"method": method, "tokens": tokens, "metrics": {"overall": value}} for method, tokens, value in rows]
    (folder / "grid.json").write_text(json.dumps(grid))


def write_scores(config, out, own=99.4):
    """Every model's grid (stage 1 scores 0 at every budget but full tokens) and the two full-token controls."""
    full, budgets = config.image_tokens, config.budgets
    score = {"sft": 50.0, "direct": 85.0, "tcd": 80.0, "tcd-nokd": 78.0, "lcd": 60.0, "stage1": 0.0}
    for name, arm, seed in [("stage1", "stage1", 0), *arm_runs(config)]:
        value = score[arm] + seed
        if name == arm:  # the first seed: every method at every budget
            rows = [("none", full, 99.0 if arm != "stage1" else 10.0)]
            rows += [(m, t, value) for m in config.methods for t in budgets[1:]]
        else:
            rows = [("none", full, 99.0)] + [("dart", t, value) for t in config.headline_budgets]
        write_grid(out, name, rows)
    for name, value in (("stage1-own", own), ("sft-blank", 16.0)):
        (out / "eval" / name).mkdir(parents=True)
        (out / "eval" / name / "metrics.json").write_text(json.dumps({"overall": value}))


def write_stage_files(config, out):
    """Every file the report reads, each accuracy a different number (so a misplaced cell shows), and measures
    with numbers of their own."""
    full, values = config.image_tokens, itertools.count(start=1.0, step=0.7)
    for name, _, _ in [("stage1", "stage1", 0), *arm_runs(config)]:
        cells = [("none", full)] + [(m, t) for m in config.methods for t in config.budgets[1:]]
        write_grid(out, name, [(method, tokens, round(next(values), 2)) for method, tokens in cells])
    for name, value in (("stage1-own", 95.5), ("sft-blank", 16.0)):
        (out / "eval" / name).mkdir(parents=True)
        (out / "eval" / name / "metrics.json").write_text(json.dumps({"overall": value}))
    measures = out / "measures"
    measures.mkdir()
    exposure = {
        arm: {"steps": 20, "steps_at_budget": index, "lr_share_at_budget": index / 7, "mean_kept_tokens": 7 + index}
        | {"first_step_at_budget": None if index == 0 else 20 - index, "kept_tokens": [7] * 20}
        for index, (name, arm, _) in enumerate(arm_runs(config))
        if name == arm
    }
    (measures / "exposure.json").write_text(json.dumps(exposure))
    logs = {"stage1": [{"loss": 1.0, "step": 5}]} | {name: [] for name, _, _ in arm_runs(config)}
    logs["tcd"] = [{"kd_loss": 0.51234, "step": 1}, {"kd_loss": 0.25678, "step": 2}, {"loss": 0.3, "step": 2}]
    (measures / "training-logs.json").write_text(json.dumps(logs))
    cost = {"model": "stage1", "batch": 8, "rows": [], "table": "method  kept  prefill ms\nnone      64  1.00"}
    (measures / "cost.json").write_text(json.dumps(cost))
    pictures = [{"model": "sft", "file": "kept-sft-0.png", "item": {}, "kept": []}]
    (measures / "pictures.json").write_text(json.dumps(pictures))


def test_every_table_cell_is_the_number_of_its_stage_file(tmp_path):
    config = demo_config(quick=True, seeds=2)
    write_stage_files(config, tmp_path)
    write_report(config, tmp_path)
    check_report(config, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| TCD (EPIC) | 0.5123 | 0.2568 |" in report  # the KD loss's first and last log
    assert "95.5% on its own questions" in report and "16.0% on blank images" in report


@pytest.mark.parametrize(
    "missing",
    [
        "eval/tcd/grid.json",
        "eval/sft-blank/metrics.json",
        "measures/exposure.json",
        "measures/cost.json",
        "measures/pictures.json",
        "measures/training-logs.json",
    ],
)
def test_a_missing_stage_file_stops_the_report_before_it_is_written(tmp_path, missing):
    config = demo_config(quick=True)
    write_stage_files(config, tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / missing} is missing"):
        write_report(config, tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_a_stage1_below_chance_is_called_so_not_only_below_the_bar(tmp_path):
    config = demo_config(quick=True)
    write_scores(config, tmp_path, own=14.5)
    text = "\n".join(checks(config, tmp_path))
    assert (
        "Stage 1 has **not** learnt to see: 14.5%" in text
        and "(**below the 90% bar**; **below chance, 25.0%**)" in text
    )
    assert "at 10.0% at full tokens (**below chance, 16.7%**): stage 2 learns" in text


def test_the_quick_banner_says_mechanics_only_with_its_sizes_and_chance():
    banner = quick_banner(demo_config(quick=True))
    assert "not a result" in banner and "noise around chance (16.7% on the scored question)" in banner
    assert "20 stage-2 steps, 1 seed, 120 test questions" in banner


def test_later_seeds_evaluated_at_the_headline_budgets_only_are_enough(tmp_path):
    config = demo_config(seeds=2)
    write_scores(config, tmp_path)
    table = headline(config, tmp_path)
    assert "| TCD (EPIC) | 2 | 99.0 ± 0.0 | 80.5 ± 0.7 | 80.5 ± 0.7 | 80.0, 81.0 |" in table
    text = "\n".join(checks(config, tmp_path))
    assert "TCD is behind direct training by 5.0 points" in text
    assert "TCD is ahead of the training-free model" in text and "its alpha = 0 ablation" in text
    assert "fastv at 7 tokens: TCD 80.0%, direct 85.0%, training-free 50.0%" in text
    assert "meets the 90% bar" in text and "the questions need the image" in text
