"""The report's tables and checks read every seed where every seed was evaluated, and only the first elsewhere."""

from __future__ import annotations

import json

from epic.demo import demo_config
from epic.demo.pipeline import arm_runs
from epic.demo.report import checks, headline


def write_grid(out, name, rows):
    folder = out / "eval" / name
    folder.mkdir(parents=True)
    grid = [{"method": method, "tokens": tokens, "metrics": {"overall": value}} for method, tokens, value in rows]
    (folder / "grid.json").write_text(json.dumps(grid))


def test_later_seeds_evaluated_at_the_headline_budgets_only_are_enough(tmp_path):
    config = demo_config(seeds=2)
    full, budgets = config.image_tokens, config.budgets
    score = {"sft": 50.0, "direct": 85.0, "tcd": 80.0, "tcd-nokd": 78.0, "lcd": 60.0, "stage1": 0.0}
    for name, arm, seed in [("stage1", "stage1", 0), *arm_runs(config)]:
        value = score[arm] + seed
        if name == arm:  # the first seed: every method at every budget
            rows = [("none", full, 99.0)] + [(m, t, value) for m in config.methods for t in budgets[1:]]
        else:
            rows = [("none", full, 99.0)] + [("dart", t, value) for t in config.headline_budgets]
        write_grid(tmp_path, name, rows)
    for name, value in (("stage1-own", 99.4), ("sft-blank", 16.0)):
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "metrics.json").write_text(json.dumps({"overall": value}))
    table = headline(config, tmp_path)
    assert "| TCD (EPIC) | 2 | 99.0 ± 0.0 | 80.5 ± 0.7 | 80.5 ± 0.7 | 80.0, 81.0 |" in table
    text = "\n".join(checks(config, tmp_path))
    assert "TCD is behind direct training by 5.0 points" in text
    assert "TCD is ahead of the training-free model" in text and "its alpha = 0 ablation" in text
    assert "fastv at 7 tokens: TCD 80.0%, direct 85.0%, training-free 50.0%" in text
    assert "meets the 90% bar" in text and "the questions need the image" in text
