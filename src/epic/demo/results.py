"""Reading the files the demo's stages write (evaluations and measures), the one rule by which its reports call a
difference, and the lines both reports share. Nothing here trains, measures or loads a model."""

from __future__ import annotations

import json
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from epic.demo.config import DemoConfig

Grid = dict[tuple[str, int], dict]  # (method, kept tokens) -> metrics; ("none", N) is full tokens

MEASURES = "measures"  # the measuring stages' folder under the output folder (see epic.demo.measure)
EXPOSURE_FILE, LOGS_FILE, PICTURES_FILE, COST_FILE = "exposure.json", "training-logs.json", "pictures.json", "cost.json"


def read_stage_file(path: Path) -> Any:
    """The JSON a stage wrote at `path`; a missing one is a FileNotFoundError naming it (a report is never written
    from part of its results)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the stage that writes it has not run (run the demo again)")
    return json.loads(path.read_text())


def read_grid(folder: Path, name: str) -> Grid:
    """`folder/eval/<name>/grid.json`, keyed by (method, tokens)."""
    rows = read_stage_file(folder / "eval" / name / "grid.json")
    return {(row["method"], row["tokens"]): row["metrics"] for row in rows}


def read_metrics(folder: Path, name: str) -> dict:
    """`folder/eval/<name>/metrics.json`: an evaluation at full tokens only."""
    return read_stage_file(folder / "eval" / name / "metrics.json")


def read_measure(folder: Path, file: str) -> Any:
    """`folder/measures/<file>`: one measuring stage's record (EXPOSURE_FILE, LOGS_FILE, ...)."""
    return read_stage_file(folder / MEASURES / file)


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


def measured_on() -> str:
    """'Measured on HOST (machine, Python, torch version), DATE UTC': where and when a report was written."""
    return (
        f"Measured on {platform.node()} ({platform.machine()}, {platform.python_version()}, torch "
        f"{version('torch')}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
