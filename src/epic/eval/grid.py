"""The evaluation grid: every method at every budget, accuracy against kept tokens (the paper's figure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from epic.compression.registry import method_spec
from epic.data.dataset import image_token_count
from epic.eval.provenance import recorded_settings
from epic.eval.runner import CompressionSettings, EvalItem, generate_answers
from epic.eval.tasks import TASKS


@dataclass
class GridRow:
    method: str  # "none" at the full budget
    tokens: int
    metrics: dict[str, object]
    settings: dict[str, object] = field(default_factory=dict)  # what the answers were made with (provenance)


def run_grid(
    model,
    processor,
    template,
    items: list[EvalItem],
    out_dir: Path,
    methods: list[str],
    budgets: list[int],
    task: str = "shapes",
    layer: int = 2,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    restart: bool = False,
) -> list[GridRow]:
    """Score every (method, budget); a budget equal to the image's token count is evaluated once, uncompressed.
    A method compresses at `layer`, or at K when written `name@K` (`divprune@0`: before the LLM).

    Each pair keeps its own predictions file (and its settings) in `out_dir`, so an interrupted grid resumes where it
    stopped and a grid of another model or data refuses to reuse them (`restart` discards them instead).
    """
    full = image_token_count(processor)
    rows = []
    if full in budgets:
        path = out_dir / "none.jsonl"
        predictions = generate_answers(
            model, processor, template, items, path, None, batch_size, max_new_tokens, restart=restart
        )
        rows.append(GridRow("none", full, TASKS[task](items, predictions), recorded_settings(path)))
    for method in methods:
        name, method_layer = method_spec(method, layer)
        for tokens in (budget for budget in budgets if budget != full):
            settings = CompressionSettings(name, tokens=tokens, layer=method_layer)
            path = out_dir / f"{method}-{tokens}.jsonl"
            predictions = generate_answers(
                model, processor, template, items, path, settings, batch_size, max_new_tokens, restart=restart
            )
            rows.append(GridRow(method, tokens, TASKS[task](items, predictions), recorded_settings(path)))
    return rows


def grid_table(rows: list[GridRow], metric: str = "overall") -> str:
    """A Markdown table: one row per method, one column per budget."""
    budgets = sorted({row.tokens for row in rows}, reverse=True)
    methods = [method for method in dict.fromkeys(row.method for row in rows) if method != "none"]
    full = {row.tokens: row.metrics[metric] for row in rows if row.method == "none"}
    lines = ["| method | " + " | ".join(str(b) for b in budgets) + " |", "| --- |" + " ---: |" * len(budgets)]
    for method in methods:
        values = {row.tokens: row.metrics[metric] for row in rows if row.method == method}
        values.update(full)
        lines.append(f"| {method} | " + " | ".join(f"{values[b]:.1f}" if b in values else "" for b in budgets) + " |")
    return "\n".join(lines)


MARKERS = "osD^v<>p"


def accuracy_axis(axis, budgets: list[int], chance: float | None, ylabel: str = "accuracy (%)") -> None:
    """The accuracy plots' shared frame: log-spaced x ticks at the budgets themselves, y from 0 to 100 (never zoomed
    onto noise), the chance level dashed where one is known."""
    from matplotlib.ticker import NullFormatter, NullLocator

    axis.set_xscale("log")
    axis.set_xticks(budgets, [str(budget) for budget in budgets])
    axis.xaxis.set_minor_locator(NullLocator())
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_xlabel("visual tokens kept per image")
    axis.set_ylim(0, 100)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if chance is not None:
        axis.axhline(chance, color="gray", linestyle=":", linewidth=1.2, label=f"chance ({chance:.1f}%)")


def offsets(count: int, step: float = 1.025) -> list[float]:
    """Multiplicative x offsets (on a log axis) that set `count` lines side by side around each budget, so equal
    values stay visible instead of hiding each other."""
    return [step ** (index - (count - 1) / 2) for index in range(count)]


def plot_grid(
    rows: list[GridRow], path: Path, metric: str = "overall", title: str = "", chance: float | None = None
) -> Figure:
    """Accuracy against kept visual tokens, one line per method (the uncompressed point shared), with one marker
    and a small x offset each, the chance level and one legend."""
    figure = Figure(figsize=(6.4, 4.2))
    axis = figure.subplots()
    full = [(row.tokens, row.metrics[metric]) for row in rows if row.method == "none"]
    methods = list(dict.fromkeys(row.method for row in rows if row.method != "none"))
    for method, marker, shift in zip(methods, MARKERS * len(methods), offsets(len(methods)), strict=False):
        points = sorted(full + [(row.tokens, row.metrics[metric]) for row in rows if row.method == method])
        tokens, values = zip(*points, strict=True)
        axis.plot([t * shift for t in tokens], values, marker=marker, label=method, alpha=0.9)
    accuracy_axis(axis, sorted({row.tokens for row in rows}), chance, f"{metric} accuracy (%)")
    if title:
        axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return figure
