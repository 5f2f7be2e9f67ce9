"""Reading the demo's evaluation files, and the one rule by which its reports call a difference."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from epic.demo.config import DemoConfig

Grid = dict[tuple[str, int], dict]  # (method, kept tokens) -> metrics; ("none", N) is full tokens


def read_grid(folder: Path, name: str) -> Grid:
    """`folder/eval/<name>/grid.json`, keyed by (method, tokens)."""
    rows = json.loads((folder / "eval" / name / "grid.json").read_text())
    return {(row["method"], row["tokens"]): row["metrics"] for row in rows}


def read_metrics(folder: Path, name: str) -> dict:
    """`folder/eval/<name>/metrics.json`: an evaluation at full tokens only."""
    return json.loads((folder / "eval" / name / "metrics.json").read_text())


def accuracy(grid: Grid, method: str, tokens: int, full: int, metric: str = "overall") -> float:
    """Accuracy (%) with `method` keeping `tokens` of `full` visual tokens (full tokens: no method)."""
    return grid[("none", full) if tokens == full else (method, tokens)][metric]


def mean(values: list[float]) -> float:
    return statistics.mean(values)


def stdev(values: list[float]) -> float:
    """The sample standard deviation; 0 for a single value (one seed shows no spread)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def spread(values: list[float]) -> str:
    """'67.5 ± 0.8' over seeds, or the one value."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{mean(values):.1f} ± {stdev(values):.1f}"


def compare(first: list[float], second: list[float]) -> tuple[float, bool]:
    """(difference of means, whether it is called): a difference counts only where it exceeds the sum of the two
    standard deviations over seeds, and never between two single runs."""
    difference = mean(first) - mean(second)
    if len(first) == 1 and len(second) == 1:
        return difference, False
    return difference, abs(difference) > stdev(first) + stdev(second)


def verdict(name: str, first: list[float], other: str, second: list[float]) -> str:
    """'TCD is ahead of direct training by 4.2 points (more than the seed spread, 2.1)', 'within the spread', or
    'not called' for two single runs."""
    difference, called = compare(first, second)
    bound = stdev(first) + stdev(second)
    if len(first) == 1 and len(second) == 1:
        return f"{name} against {other}: {difference:+.1f} points (one run each: not called)"
    if not called:
        return f"{name} and {other} are within the seed spread ({difference:+.1f} points; spread {bound:.1f})"
    side = "ahead of" if difference > 0 else "behind"
    return f"{name} is {side} {other} by {abs(difference):.1f} points (more than the seed spread, {bound:.1f})"


def quick_banner(config: DemoConfig) -> str:
    """What a `--quick` report is: the mechanics end to end, at sizes where its numbers are noise."""
    seeds = f"{config.seeds} seed{'s' * (config.seeds > 1)}"
    sizes = (
        f"{config.stage1_steps} stage-1 steps, {config.stage2_steps} stage-2 steps, {seeds}, {config.n_test} test "
        f"questions, hidden size {config.hidden_size}"
    )
    return (
        "> **`epic demo --quick`: a check of the mechanics, not a result.** Every stage runs end to end at sizes far "
        f"too small to learn the task ({sizes}), so every accuracy below is noise around chance "
        f"({config.chance():.1f}% on the scored question): read no difference from it. Run `epic demo` for the "
        "experiment."
    )
