"""The report's tables and checks read every seed where every seed was evaluated, and only the first elsewhere."""

from __future__ import annotations

import json

from epic.demo import demo_config
from epic.demo.pipeline import arm_runs
from epic.demo.report import checks, headline
from epic.demo.results import quick_banner


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
