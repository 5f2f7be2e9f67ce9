"""Reading the demo's reports back: their tables, cell by cell, against the stage files they were rendered from.

The expected values are read from the raw JSON here (not through `epic.demo.results`), so a report that drops a
row, shifts a column or reads the wrong file fails these checks.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from epic.demo.config import ARMS, KD_ARMS, DemoConfig, seed_names
from epic.demo.kd_report import LABELS as KD_LABELS
from epic.demo.report import LABELS


def table(report: str, heading: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first table after the `## heading...` line."""
    lines = report.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(f"## {heading}"))
    first = next(index for index in range(start + 1, len(lines)) if lines[index].startswith("|"))
    rows = []
    for line in lines[first + 2 :]:  # after the header and its separator
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    """A table cell's number ('16.7', '**99.6**', '31.6%'); a ValueError where the cell holds none."""
    return float(cell.strip("*").removesuffix("%"))


def _raw_value(out: Path, name: str, method: str, tokens: int, full: int) -> float:
    """`eval/<name>/grid.json`'s overall accuracy with `method` at `tokens` (full tokens: method none)."""
    rows = json.loads((out / "eval" / name / "grid.json").read_text())
    key = ("none", full) if tokens == full else (method, tokens)
    (value,) = [row["metrics"]["overall"] for row in rows if (row["method"], row["tokens"]) == key]
    return value


def grid_value(out: Path, name: str, method: str, tokens: int, full: int) -> str:
    """That accuracy as the reports print it."""
    return f"{_raw_value(out, name, method, tokens, full):.1f}"


def check_report(config: DemoConfig, out: Path) -> None:
    """Every table of `out/report.md` holds, in every cell, the number its stage file gives."""
    report = (out / "report.md").read_text()
    full, (target, low) = config.image_tokens, config.headline_budgets
    method, names = config.train_method, [config.stage1_name, *ARMS]

    headline = {row[0]: row for row in table(report, "Headline")}
    assert list(headline) == [LABELS[name] for name in names]
    for arm in ARMS:
        row, seeds = headline[LABELS[arm]], seed_names(config, arm)
        assert row[1] == str(len(seeds))
        assert row[-1].split(", ") == [grid_value(out, name, method, target, full) for name in seeds]
        for cell, tokens in zip(row[2:5], (full, target, low), strict=True):
            values = [_raw_value(out, name, method, tokens, full) for name in seeds]
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            assert cell == f"{statistics.mean(values):.1f}{spread}"

    budgets = table(report, "Accuracy at every budget")
    assert [row[0] for row in budgets] == [LABELS[name] for name in names]
    for name, row in zip(names, budgets, strict=True):
        assert row[1:] == [grid_value(out, name, method, tokens, full) for tokens in config.budgets]
        assert all(number(cell) >= 0 for cell in row[1:])

    generalisation = table(report, "Generalisation")
    cells = [(other, tokens) for other in config.methods for tokens in config.budgets[1:]]
    assert [(row[0], int(row[1])) for row in generalisation] == cells
    for (other, tokens), row in zip(cells, generalisation, strict=True):
        assert row[2:] == [grid_value(out, name, other, tokens, full) for name in names]

    exposures = json.loads((out / "measures" / "exposure.json").read_text())
    exposure_rows = table(report, "Budget exposure")
    assert [row[0] for row in exposure_rows] == [LABELS[arm] for arm in ARMS]
    for arm, row in zip(ARMS, exposure_rows, strict=True):
        seen = exposures[arm]
        assert row[1] == f"{seen['steps_at_budget']} of {seen['steps']}"
        assert number(row[2]) == round(100 * seen["lr_share_at_budget"], 1)
        assert number(row[4]) == round(seen["mean_kept_tokens"], 1)

    logs = json.loads((out / "measures" / "training-logs.json").read_text())
    for name, row in zip(names, table(report, "Distillation"), strict=True):
        kd = [entry["kd_loss"] for entry in logs[name] if "kd_loss" in entry]
        assert row[0] == LABELS[name] and row[1:3] == ([f"{kd[0]:.4f}", f"{kd[-1]:.4f}"] if kd else ["-", "-"])
        assert row[3:5] == [grid_value(out, name, method, tokens, full) for tokens in (full, target)]

    cost = json.loads((out / "measures" / "cost.json").read_text())
    assert f"```\n{cost['table']}\n```" in report and f"batch of {cost['batch']} prompts" in report
    pictures = json.loads((out / "measures" / "pictures.json").read_text())
    assert pictures and all(f"![kept tokens]({picture['file']})" in report for picture in pictures)


def check_kd_report(config: DemoConfig, kd: Path) -> None:
    """Every table of `kd/kd-report.md` holds the numbers of the KD stages' files."""
    report = (kd / "kd-report.md").read_text()
    full, method, names = config.image_tokens, config.train_method, ["teacher", *KD_ARMS]
    headline = table(report, "Headline")
    assert [row[0] for row in headline] == [KD_LABELS[name] for name in names]
    for name, row in zip(names, headline, strict=True):
        assert row[1:3] == [grid_value(kd, name, method, tokens, full) for tokens in (full, config.target_tokens)]
    budgets = table(report, "Accuracy (%) at every budget")
    for name, row in zip(names, budgets, strict=True):
        assert row[0] == KD_LABELS[name]
        assert row[1:] == [grid_value(kd, name, method, tokens, full) for tokens in config.budgets]
    logs = json.loads((kd / "measures" / "training-logs.json").read_text())
    losses = table(report, "Training losses")
    assert [row[0] for row in losses] == list(logs)
    for run, row in zip(logs, losses, strict=True):
        entries = [entry for entry in logs[run] if "loss" in entry]
        assert row[1] == str(logs[run][-1]["step"])
        assert f"loss {entries[0]['loss']:.3f} -> {entries[-1]['loss']:.3f}" in row[2]
