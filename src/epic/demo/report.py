"""`report.md` of `epic demo`: the paper's tables in miniature, measured in this run, with plots and the settings.

Every number comes from the evaluation files the demo wrote (`eval/<model>/grid.json`) or is measured here (the
cost table, the kept-token pictures). Checks the comparison depends on (a strong base, questions that need the
image, a base that loses under compression, a distillation with something to teach) are stated as measured,
passed or not.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from epic.data.templates import get_template
from epic.demo.config import DemoConfig
from epic.demo.pipeline import COMPARISONS, model_name, read_log
from epic.eval.bench import format_bench, run_bench, synthetic_prompt
from epic.eval.show import draw_kept, kept_patches

LABELS = {
    "base": "base (LLaVA-1.5 row)",
    "sft": "+ SFT, full tokens",
    "direct": "+ direct SFT at the budget",
    "tcd": "+ TCD (EPIC)",
    "lcd": "+ LCD (EPIC)",
}
STRONG_BASE = 90.0  # percent: below this no comparison means much
CLEAR_DROP = 10.0  # points the base must lose at N/9 without training, or distillation has nothing to close


def _grid(out: Path, name: str) -> dict[tuple[str, int], dict]:
    rows = json.loads((out / "eval" / name / "grid.json").read_text())
    return {(row["method"], row["tokens"]): row["metrics"] for row in rows}


def _accuracy(grid: dict, method: str, tokens: int, full: int, metric: str = "overall") -> float:
    return grid[("none", full) if tokens == full else (method, tokens)][metric]


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def headline(config: DemoConfig, out: Path) -> tuple[str, dict[str, list[float]]]:
    """At the N/9 budget with the training method: mean ± standard deviation over the fine-tuning seeds."""
    full, target, method = config.image_tokens, config.target_tokens, config.train_method
    base = _grid(out, "base")
    scores: dict[str, list[float]] = {
        "base, full tokens": [_accuracy(base, method, full, full)],
        "base, training-free": [_accuracy(base, method, target, full)],
    }
    for kind in COMPARISONS:
        grids = [_grid(out, model_name(kind, index)) for index in range(config.fine_tune_seeds)]
        scores[LABELS[kind]] = [_accuracy(grid, method, target, full) for grid in grids]
    seeds = ", ".join(str(config.seed + index) for index in range(config.fine_tune_seeds))
    lines = [
        f"| model ({method} at {target} of {full} tokens; seeds {seeds}) | overall accuracy (%) | per seed |",
        "| --- | ---: | --- |",
    ]
    for label, values in scores.items():
        lines.append(f"| {label} | {_spread(values)} | {', '.join(f'{v:.1f}' for v in values)} |")
    return "\n".join(lines), scores


def table_one(config: DemoConfig, out: Path) -> str:
    """Accuracy per question type and overall, per model and budget, with the training method (Table 1)."""
    full, method = config.image_tokens, config.train_method
    types = list(config.question_types)
    lines = [
        "| model | tokens | " + " | ".join(types) + " | overall |",
        "| --- | ---: |" + " ---: |" * (len(types) + 1),
    ]
    for name in ("base", *COMPARISONS):
        grid = _grid(out, name)
        for tokens in config.budgets:
            values = [_accuracy(grid, method, tokens, full, metric) for metric in [*types, "overall"]]
            lines.append(f"| {LABELS[name]} | {tokens} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def generalisation(config: DemoConfig, out: Path) -> str:
    """Models trained with the training method, evaluated with every method (Table: generalisation)."""
    full = config.image_tokens
    names = ("base", "direct", "tcd", "lcd")
    lines = ["| method | tokens | " + " | ".join(LABELS[n] for n in names) + " |", "| --- | ---: |" + " ---: |" * 4]
    grids = [_grid(out, name) for name in names]
    for method in config.methods:
        for tokens in config.budgets[1:]:
            values = [_accuracy(grid, method, tokens, full) for grid in grids]
            lines.append(f"| {method} | {tokens} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def plot_accuracy(config: DemoConfig, out: Path, path: Path) -> None:
    """Accuracy against kept tokens: one panel per method, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = config.image_tokens
    names = ("base", *COMPARISONS)
    grids = [_grid(out, name) for name in names]
    figure, axes = plt.subplots(
        1, len(config.methods), figsize=(4.2 * len(config.methods), 3.8), sharey=True, squeeze=False
    )
    axes = axes[0]
    for axis, method in zip(axes, config.methods, strict=True):
        for name, grid in zip(names, grids, strict=True):
            points = [(tokens, _accuracy(grid, method, tokens, full)) for tokens in sorted(config.budgets)]
            axis.plot(*zip(*points, strict=True), marker="o", label=LABELS[name])
        axis.set_xscale("log", base=2)
        axis.set_title(f"evaluated with {method}")
        axis.set_xlabel("visual tokens kept per image")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("overall accuracy (%)")
    axes[-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


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


def kd_diagnostics(config: DemoConfig, out: Path, models: dict[str, Path]) -> str:
    """The KD loss at the start and the end of each distillation, and the teacher's accuracy advantage: the same
    model at full tokens against the budget (what the student is asked to recover)."""
    full, target, method = config.image_tokens, config.target_tokens, config.train_method
    lines = [
        "| model | KD loss, first log | KD loss, last log | accuracy at full tokens | at the budget | gap |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("base", *COMPARISONS):
        kd = [entry["kd_loss"] for entry in read_log(models[name]) if "kd_loss" in entry]
        grid = _grid(out, name)
        at_full, at_budget = _accuracy(grid, method, full, full), _accuracy(grid, method, target, full)
        first, last = (f"{kd[0]:.4f}", f"{kd[-1]:.4f}") if kd else ("-", "-")
        lines.append(
            f"| {LABELS[name]} | {first} | {last} | {at_full:.1f} | {at_budget:.1f} | {at_full - at_budget:+.1f} |"
        )
    return "\n".join(lines)


def pictures(config: DemoConfig, data: Path, models: dict[str, Path], out: Path) -> list[Path]:
    """Kept tokens of every method at N/9 on the first test images, for the base and the TCD model."""
    items = json.loads((data / "test.json").read_text())[: config.pictures]
    paths = []
    for name in ("base", "tcd"):
        model = LlavaForConditionalGeneration.from_pretrained(models[name]).eval()
        processor = AutoProcessor.from_pretrained(models[name])
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
            draw_kept(image, kept).save(path)
            paths.append(path)
    return paths


def write_report(config: DemoConfig, out: Path, data: Path, models: dict[str, Path]) -> Path:
    """Write `report.md` (and its plots) and print the headline table."""
    full, target = config.image_tokens, config.target_tokens
    headline_table, scores = headline(config, out)
    base_full = scores["base, full tokens"][0]
    base_free = scores["base, training-free"][0]
    blank = json.loads((out / "eval" / "base-blank" / "metrics.json").read_text())["overall"]
    plot_accuracy(config, out, out / "accuracy.png")
    picture_paths = pictures(config, data, models, out)
    checks = [
        f"- Base model at full tokens: {base_full:.1f}% "
        + ("(meets the 90% bar)." if base_full >= STRONG_BASE else f"(**below the {STRONG_BASE:.0f}% bar**)."),
        f"- Control, the base model on blank images: {blank:.1f}% (the questions need the image when this is far "
        "below the base).",
        f"- Training-free {config.train_method} at {target} tokens costs the base {base_full - base_free:.1f} points "
        + (
            "(a clear loss: distillation has a gap to close)."
            if base_full - base_free >= CLEAR_DROP
            else f"(**less than {CLEAR_DROP:.0f} points: compression costs this model little, so distillation has "
            "little to close**)."
        ),
    ]
    tcd, direct = statistics.mean(scores[LABELS["tcd"]]), statistics.mean(scores[LABELS["direct"]])
    lcd = statistics.mean(scores[LABELS["lcd"]])
    checks.append(
        f"- At {target} tokens: TCD {tcd:.1f}%, LCD {lcd:.1f}%, direct SFT {direct:.1f}%, training-free base "
        f"{base_free:.1f}%, base at full tokens {base_full:.1f}% (means over {config.fine_tune_seeds} seed(s))."
    )
    sections = [
        "# epic demo: the EPIC experiment in miniature",
        f"Measured on {platform.node()} ({platform.machine()}, {platform.python_version()}, torch "
        f"{torch.__version__}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. A tiny LLaVA "
        f"({config.num_layers}-layer Llama, hidden {config.hidden_size}; one-layer CLIP tower) on the built-in shapes "
        f"set: {full} visual tokens per image, compression before layer {config.layer}, budgets {config.budgets} "
        f"(the paper's 576/192/128/64/36 scaled to {full}). Test split: {config.n_test} questions.",
        "## Headline",
        headline_table,
        "\n".join(checks),
        "## Table 1 in miniature: accuracy per question type (%), evaluated with " + config.train_method,
        table_one(config, out),
        "## Generalisation: trained with " + config.train_method + ", evaluated with every method (overall %)",
        generalisation(config, out),
        "![accuracy against kept tokens](accuracy.png)",
        "## Distillation: what there was to teach",
        "The teacher is the same model at full tokens (TCD's and LCD's consistency target); the gap is its accuracy "
        "advantage over the compressed student on the test split.",
        kd_diagnostics(config, out, models),
        "## Cost of each budget (" + config.train_method + ", batch of 8 prompts, one thread, measured in this run)",
        "```\n" + cost_table(config, models["base"]) + "\n```",
        "## What the methods keep (" + f"{target} of {full} tokens; base model, then TCD model)",
        "\n".join(f"![kept tokens]({path.name})" for path in picture_paths),
        "## Configuration",
        "```json\n" + json.dumps(config.as_dict(), indent=1) + "\n```",
        "Models in `models/`, their training logs in `models/*/log_history.json`, predictions in `eval/`. Re-run "
        "with the same `--out` to reuse the base model (and any finished run).",
    ]
    report = out / "report.md"
    report.write_text("\n\n".join(sections) + "\n")
    print(headline_table)
    print("\n".join(checks))
    print(f"report: {report}")
    return report


def write_kd_report(config: DemoConfig, kd: Path, logs: dict[str, list[dict]]) -> Path:
    """Write `kd-report.md` for `epic demo --kd` (LLaVA-KD's PT-SFT against DPT-SFT-DFT) and print its headline."""
    from epic.demo.kd import ARMS
    from epic.demo.kd import LABELS as KD_LABELS

    full, target, method = config.image_tokens, config.target_tokens, config.train_method
    types = list(config.question_types)
    grids = {name: _grid(kd, name) for name in ("teacher", *ARMS)}
    headline_table = [
        f"| model | full tokens ({full}) | {method} at {target} tokens | " + " | ".join(types) + " (full) |",
        "| --- | ---: | ---: |" + " ---: |" * len(types),
    ]
    for name, grid in grids.items():
        values = [_accuracy(grid, method, full, full), _accuracy(grid, method, target, full)]
        values += [_accuracy(grid, method, full, full, kind) for kind in types]
        headline_table.append(f"| {KD_LABELS[name]} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    budgets = ["| model | " + " | ".join(str(b) for b in config.budgets) + " |"]
    budgets.append("| --- |" + " ---: |" * len(config.budgets))
    for name, grid in grids.items():
        values = [_accuracy(grid, method, tokens, full) for tokens in config.budgets]
        budgets.append(f"| {KD_LABELS[name]} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    losses = ["| run | steps | loss parts (first log -> last log) |", "| --- | ---: | --- |"]
    for run, log in logs.items():
        entries = [entry for entry in log if "loss" in entry] or [{}]
        parts = [key for key in ("loss", *(f"{p}_loss" for p in ("ce", "res", "vis", "rel"))) if key in entries[0]]
        text = ", ".join(f"{key} {entries[0][key]:.3f} -> {entries[-1][key]:.3f}" for key in parts) or "-"
        steps = log[-1].get("step", "-") if log else "-"
        losses.append(f"| {run} | {steps} | {text} |")
    teacher = _accuracy(grids["teacher"], method, full, full)
    without, with_kd = (_accuracy(grids[arm], method, full, full) for arm in ARMS)
    checks = [
        f"- Teacher at full tokens: {teacher:.1f}%; students: {without:.1f}% without KD (PT-SFT), {with_kd:.1f}% "
        f"with LLaVA-KD (DPT-SFT-DFT), a difference of {with_kd - without:+.1f} points (one seed: read it with the "
        "main demo's seed spread in mind).",
        f"- The teacher's advantage over the student without KD: {teacher - without:+.1f} points (what "
        "distillation can hand over).",
    ]
    spec = config.kd_student_spec()
    sections = [
        "# epic demo --kd: LLaVA-KD's ablation in miniature",
        f"Measured on {platform.node()} ({platform.machine()}, {platform.python_version()}, torch "
        f"{torch.__version__}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Teacher: the demo's base "
        f"model ({config.num_layers} layers, hidden {config.hidden_size}). Student: {spec.num_layers} layers, hidden "
        f"{spec.hidden_size}, the teacher's tokenizer and (frozen) vision tower. Both arms: the same initialisation, "
        f"{config.kd_pt_steps + config.kd_sft_steps + config.kd_dft_steps} steps on the same questions. Test split: "
        f"{config.n_test} questions.",
        "## Headline (accuracy, %)",
        "\n".join(headline_table),
        "\n".join(checks),
        f"## Accuracy (%) at every budget, {method} before layer {config.layer}",
        "\n".join(budgets),
        "## Training losses",
        "\n".join(losses),
        "## Configuration",
        "```json\n" + json.dumps(config.kd_key(), indent=1) + "\n```",
    ]
    report = kd / "kd-report.md"
    report.write_text("\n\n".join(sections) + "\n")
    print("\n".join(headline_table))
    print("\n".join(checks))
    print(f"report: {report}")
    return report
