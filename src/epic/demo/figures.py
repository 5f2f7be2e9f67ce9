"""The demo report's pictures and measured cost: accuracy against kept tokens, the headline with its seeds, what
each method keeps, and the cost of each budget."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from matplotlib.figure import Figure
from transformers import AutoProcessor, LlavaForConditionalGeneration

from epic.data.templates import get_template
from epic.demo.config import DemoConfig
from epic.demo.pipeline import seed_names
from epic.demo.results import accuracy, mean, read_grid, stdev
from epic.eval.bench import format_bench, run_bench, synthetic_prompt
from epic.eval.grid import MARKERS, accuracy_axis, offsets
from epic.eval.show import draw_kept, kept_patches


def _suptitle(config: DemoConfig, figure) -> None:
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


def cost_table(config: DemoConfig, model_dir: Path, repeats: int = 5) -> str:
    """FLOPs (formula), KV cache (measured and formula) and prefill time against full tokens, measured here."""
    torch.set_num_threads(1)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    inputs = synthetic_prompt(model, text_tokens=30, batch=8, seed=config.seed)
    with torch.inference_mode():
        rows = run_bench(
            model, inputs, [config.train_method], config.budgets[1:], config.layer, repeats, progress=False
        )
    return format_bench(rows)


def pictures(config: DemoConfig, data: Path, models: dict[str, Path], out: Path) -> list[Path]:
    """Kept tokens of every method at N/9 on the first test images, for each of `models`."""
    items = json.loads((data / "test.json").read_text())[: config.pictures]
    paths = []
    for name, folder in models.items():
        model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
        processor = AutoProcessor.from_pretrained(folder)
        template = get_template(config.template, processor.tokenizer)
        for index, item in enumerate(items):
            image, kept = kept_patches(
                model,
                processor,
                template,
                data / "images" / item["image"],
                item["question"],
                list(config.methods),
                config.target_tokens,
                config.layer,
            )
            path = out / f"kept-{name}-{index}.png"
            draw_kept(image, kept, f"{item['question']}  (truth: {item['answer']})").save(path)
            paths.append(path)
    return paths
