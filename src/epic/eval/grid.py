"""The evaluation grid: every method at every budget, accuracy against kept tokens (the paper's figure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
        for tokens in (budget for budget in budgets if budget != full):
            settings = CompressionSettings(method, tokens=tokens, layer=layer)
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


def plot_grid(rows: list[GridRow], path: Path, metric: str = "overall") -> None:
    """Accuracy against kept visual tokens, one line per method (the uncompressed point shared)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    full = [(row.tokens, row.metrics[metric]) for row in rows if row.method == "none"]
    for method in dict.fromkeys(row.method for row in rows if row.method != "none"):
        points = sorted(full + [(row.tokens, row.metrics[metric]) for row in rows if row.method == method])
        axis.plot(*zip(*points, strict=True), marker="o", label=method)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("visual tokens kept per image")
    axis.set_ylabel(f"{metric} accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
