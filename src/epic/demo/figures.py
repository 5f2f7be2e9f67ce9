"""The demo report's plots, drawn from the evaluation files alone: accuracy against kept tokens, and the headline
with its seeds. (What each method keeps is drawn by `epic.demo.measure`, which runs the models.)"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from epic.demo.config import DemoConfig, seed_names
from epic.demo.results import accuracy, mean, read_grid, stdev
from epic.eval.grid import MARKERS, accuracy_axis, offsets


def _suptitle(config: DemoConfig, figure: Figure) -> None:
    figure.suptitle(
        f"tiny LLaVA ({config.image_tokens} visual tokens), shapes {'/'.join(config.question_types)} question, "
        f"{config.n_test} test items, CPU{' (--quick)' if config.quick else ''}",
        fontsize=9,
    )


def plot_accuracy(config: DemoConfig, out: Path, names: list[str], labels: dict[str, str], path: Path) -> Figure:
    """Accuracy against kept tokens: one panel per method, one line per model (first seeds), one legend."""
    full = config.image_tokens
    budgets = sorted(config.budgets)
    grids = [read_grid(out, name) for name in names]
    figure = Figure(figsize=(4.2 * len(config.methods), 4.2))
    axes = figure.subplots(1, len(config.methods), sharey=True, squeeze=False)[0]
    for axis, method in zip(axes, config.methods, strict=True):
        shifts = offsets(len(names))
        for index, (name, grid) in enumerate(zip(names, grids, strict=True)):
            values = [accuracy(grid, method, tokens, full) for tokens in budgets]
            marker = MARKERS[index % len(MARKERS)]
            axis.plot([t * shifts[index] for t in budgets], values, marker=marker, label=labels[name], alpha=0.9)
        accuracy_axis(axis, budgets, config.chance(), ylabel="")
        axis.set_title(f"evaluated with {method}", fontsize=9)
    axes[0].set_ylabel("accuracy (%)")
    handles, names_shown = axes[0].get_legend_handles_labels()
    figure.legend(handles, names_shown, loc="lower center", ncol=min(len(handles), 4), fontsize=7)
    _suptitle(config, figure)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=110)
    return figure


def plot_headline(config: DemoConfig, out: Path, arms: list[str], labels: dict[str, str], path: Path) -> Figure:
    """Each arm at N/9 and N/16: the mean over seeds with its standard deviation, and every seed as a dot."""
    figure = Figure(figsize=(9.5, 4.2))
    axes = figure.subplots(1, 2, sharey=True)
    for axis, tokens in zip(axes, config.headline_budgets, strict=True):
        for position, arm in enumerate(arms):
            names = seed_names(config, arm)
            values = [accuracy(read_grid(out, n), config.train_method, tokens, config.image_tokens) for n in names]
            axis.bar(position, mean(values), yerr=stdev(values), capsize=4, color=f"C{position}", alpha=0.7)
            axis.scatter([position] * len(values), values, color="black", s=10, zorder=3)
        level = config.chance()
        axis.axhline(level, color="gray", linestyle=":", linewidth=1.2, label=f"chance ({level:.1f}%)")
        axis.set_ylim(0, 100)
        axis.set_xticks(range(len(arms)), [labels[arm] for arm in arms], rotation=20, ha="right", fontsize=8)
        axis.set_title(f"evaluated with {config.train_method}, {tokens} of {config.image_tokens} tokens", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7, loc="upper left")
    _suptitle(config, figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return figure
