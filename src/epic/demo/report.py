"""`report.md` of `epic demo`: the paper's comparison in miniature, measured in this run, with plots and settings.

The report only renders: every number comes from a file the demo's stages wrote, the evaluations
(`eval/<model>/grid.json`, `metrics.json`) and the measures (`measures/`: budget exposure replayed from the runs'
own options, the training logs, the kept-token pictures, the cost of each budget; see `epic.demo.measure`); a
missing one stops it. What the comparison depends on (a stage-1 model that sees but does not yet answer,
questions that need the image) and what the paper claims (TCD ahead of direct training, of the training-free model
and of its own ablation without distillation) are stated as measured, a difference called only where it exceeds
the seed spread.
"""

from __future__ import annotations

import json
from pathlib import Path

from epic.data.shapes import chance_accuracy
from epic.demo.config import ARMS, DemoConfig, arm_runs, model_name, seed_names
from epic.demo.figures import plot_accuracy, plot_headline
from epic.demo.results import (
    COST_FILE,
    EXPOSURE_FILE,
    LOGS_FILE,
    PICTURES_FILE,
    accuracy,
    mean,
    measured_on,
    quick_banner,
    read_grid,
    read_measure,
    read_metrics,
    spread,
    verdict,
)

LABELS = {
    "stage1": "stage-1 model (before stage 2)",
    "base": "base (trained on the scored question)",
    "sft": "SFT at full tokens, evaluated compressed (w/o train)",
    "direct": "direct training at the budget",
    "tcd": "TCD (EPIC)",
    "tcd-nokd": "TCD draws, alpha = 0 (no distillation)",
    "lcd": "LCD (EPIC)",
}
SHORT = {"sft": "SFT (w/o train)", "direct": "direct", "tcd": "TCD", "tcd-nokd": "TCD, alpha 0", "lcd": "LCD"}
STAGE1_BAR = 90.0  # percent on the stage-1 model's own questions: it has learnt to see the places
NEAR_CHANCE = 35.0  # percent on the scored question before stage 2 (the colour question's chance: 16.7%)
FEW_POINTS = 5.0  # "within a few points of full tokens"
CLEAR_GAP = 20.0  # points between the test images and blank ones: the questions need the image


def against_chance(value: float, level: float) -> str:
    """'chance 25.0%', or a bold 'below chance, 25.0%' where it is."""
    return f"**below chance, {level:.1f}%**" if value < level else f"chance {level:.1f}%"


def scores(
    config: DemoConfig, out: Path, arm: str, tokens: int, method: str | None = None, first_only: bool = False
) -> list[float]:
    """Accuracy of every seed of `arm` (or of its first: the only one evaluated with every method) with `method`
    (the training method by default) at `tokens`."""
    method = method or config.train_method
    names = seed_names(config, arm)[:1] if first_only else seed_names(config, arm)
    return [accuracy(read_grid(out, name), method, tokens, config.image_tokens) for name in names]


def headline(config: DemoConfig, out: Path) -> str:
    """Full tokens, N/9 and N/16 with the training method: mean ± standard deviation over seeds, then each seed."""
    full, (target, low) = config.image_tokens, config.headline_budgets
    method = config.train_method
    lines = [
        f"| model ({method} before layer {config.layer}) | seeds | {full} tokens (full) | {target} (N/9) | "
        f"{low} (N/16) | N/9 per seed |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    stage1 = read_grid(out, config.stage1_name)
    values = [accuracy(stage1, method, tokens, full) for tokens in (full, target, low)]
    lines.append(f"| {LABELS[config.stage1_name]} | 1 | " + " | ".join(f"{v:.1f}" for v in values) + " | |")
    for arm in ARMS:
        at = {tokens: scores(config, out, arm, tokens) for tokens in (full, target, low)}
        per_seed = ", ".join(f"{v:.1f}" for v in at[target])
        cells = " | ".join(spread(at[tokens]) for tokens in (full, target, low))
        lines.append(f"| {LABELS[arm]} | {len(at[target])} | {cells} | {per_seed} |")
    return "\n".join(lines)


def checks(config: DemoConfig, out: Path) -> list[str]:
    """What the comparison depends on, and the paper's claims at N/9, as measured."""
    full, (target, low) = config.image_tokens, config.headline_budgets
    stage1 = read_grid(out, config.stage1_name)
    scored = accuracy(stage1, config.train_method, full, full)
    lines = []
    if config.from_base:
        lines.append(
            f"- `--from-base`: the base answers the scored question at {scored:.1f}% at full tokens before any arm "
            "trains; every arm only fine-tunes it (not the paper's set-up: see docs/demo.md)."
        )
    else:
        own = read_metrics(out, f"{config.stage1_name}-own")["overall"]
        own_chance = chance_accuracy(config.stage1_types)
        if own >= STAGE1_BAR:
            learnt = f"Stage 1 has learnt to see: {own:.1f}% on its own questions"
            bar = f"meets the {STAGE1_BAR:.0f}% bar"
        else:
            learnt = f"Stage 1 has **not** learnt to see: {own:.1f}% on its own questions"
            bar = f"**below the {STAGE1_BAR:.0f}% bar**; {against_chance(own, own_chance)}"
        lines.append(f"- {learnt} ({', '.join(config.stage1_types)}) at full tokens ({bar}).")
        level = config.chance()
        if scored < level:
            outcome = "stage 2 learns the task under each arm's compression."
        elif scored <= NEAR_CHANCE:
            outcome = "near chance, so stage 2 learns the task under each arm's compression, as in the paper."
        else:
            outcome = f"**above {NEAR_CHANCE:.0f}%: stage 1 already teaches the scored task**."
        lines.append(
            f"- Before stage 2 it answers the scored question at {scored:.1f}% at full tokens "
            f"({against_chance(scored, level)}): {outcome}"
        )
    sft_full = scores(config, out, "sft", full)
    blank = read_metrics(out, "sft-blank")["overall"]
    needs = (
        "the questions need the image"
        if mean(sft_full) - blank >= CLEAR_GAP
        else f"**less than {CLEAR_GAP:.0f} points apart: the questions may not need the image**"
    )
    lines.append(
        f"- Control: the SFT model scores {blank:.1f}% on blank images against {mean(sft_full):.1f}% on the test "
        f"images ({needs})."
    )
    for tokens, name in ((target, "N/9"), (low, "N/16")):
        tcd = scores(config, out, "tcd", tokens)
        parts = [
            verdict("TCD", tcd, "direct training", scores(config, out, "direct", tokens)),
            verdict("TCD", tcd, "the training-free model (SFT at full tokens)", scores(config, out, "sft", tokens)),
            verdict("TCD", tcd, "its alpha = 0 ablation", scores(config, out, "tcd-nokd", tokens)),
        ]
        lines.append(f"- At {tokens} tokens ({name}): " + "; ".join(parts) + ".")
    tcd, best_full = mean(scores(config, out, "tcd", target)), mean(sft_full)
    within = f"within {FEW_POINTS:.0f} points" if best_full - tcd <= FEW_POINTS else f"**more than {FEW_POINTS:.0f}**"
    lines.append(
        f"- TCD at N/9 is {best_full - tcd:.1f} points below SFT at full tokens ({tcd:.1f}% against "
        f"{best_full:.1f}%): {within}."
    )
    for method in config.methods:
        if method == config.train_method:
            continue
        free = scores(config, out, "sft", target, method, first_only=True)
        trained = {arm: scores(config, out, arm, target, method, first_only=True) for arm in ("tcd", "direct")}
        lines.append(
            f"- Generalisation, {method} at {target} tokens: TCD {trained['tcd'][0]:.1f}%, direct "
            f"{trained['direct'][0]:.1f}%, training-free {free[0]:.1f}% (first seeds: one run each, no spread)."
        )
    return lines


def per_budget(config: DemoConfig, out: Path) -> str:
    """Every model (first seed) at every budget, with the training method."""
    full, method = config.image_tokens, config.train_method
    names = [config.stage1_name, *(model_name(arm, 0) for arm in ARMS)]
    lines = ["| model | " + " | ".join(str(b) for b in config.budgets) + " |"]
    lines.append("| --- |" + " ---: |" * len(config.budgets))
    for name in names:
        grid = read_grid(out, name)
        values = [accuracy(grid, method, tokens, full) for tokens in config.budgets]
        lines.append(f"| {LABELS[name]} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def generalisation(config: DemoConfig, out: Path) -> str:
    """Models trained with the training method (first seeds), evaluated with every method."""
    full = config.image_tokens
    names = [config.stage1_name, *ARMS]
    lines = ["| method | tokens | " + " | ".join(LABELS[n] for n in names) + " |"]
    lines.append("| --- | ---: |" + " ---: |" * len(names))
    grids = [read_grid(out, name) for name in names]
    for method in config.methods:
        for tokens in config.budgets[1:]:
            values = [accuracy(grid, method, tokens, full) for grid in grids]
            lines.append(f"| {method} | {tokens} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def exposure_table(config: DemoConfig, out: Path) -> str:
    """Per arm (first seed): steps and share of the summed learning rate at the scored budget and layer."""
    lines = [
        f"| arm | steps at <= {config.target_tokens} tokens from layer {config.layer} | share of the learning rate "
        "| first such step | mean kept tokens |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    exposures = read_measure(out, EXPOSURE_FILE)
    for name, arm, _ in arm_runs(config):
        if name != arm:
            continue
        seen = exposures[name]
        first = "-" if seen["first_step_at_budget"] is None else str(seen["first_step_at_budget"])
        lines.append(
            f"| {LABELS[arm]} | {seen['steps_at_budget']} of {seen['steps']} | "
            f"{100 * seen['lr_share_at_budget']:.1f}% | {first} | {seen['mean_kept_tokens']:.1f} |"
        )
    return "\n".join(lines)


def kd_diagnostics(config: DemoConfig, out: Path) -> str:
    """The KD loss at the start and the end of each distillation, and each model's own full-tokens advantage over
    the budget (what a consistency target at full tokens has to hand over)."""
    full, target, method = config.image_tokens, config.target_tokens, config.train_method
    lines = [
        "| model | KD loss, first log | KD loss, last log | accuracy at full tokens | at the budget | gap |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    logs = read_measure(out, LOGS_FILE)
    for name in (config.stage1_name, *ARMS):
        kd = [entry["kd_loss"] for entry in logs[name] if "kd_loss" in entry]
        grid = read_grid(out, name)
        at_full, at_budget = accuracy(grid, method, full, full), accuracy(grid, method, target, full)
        first, last = (f"{kd[0]:.4f}", f"{kd[-1]:.4f}") if kd else ("-", "-")
        lines.append(
            f"| {LABELS[name]} | {first} | {last} | {at_full:.1f} | {at_budget:.1f} | {at_full - at_budget:+.1f} |"
        )
    return "\n".join(lines)


def write_report(config: DemoConfig, out: Path) -> Path:
    """Write `report.md` (and its plots) from the stages' files in `out`, and print the headline table and the
    checks."""
    full, target = config.image_tokens, config.target_tokens
    headline_table, check_lines = headline(config, out), checks(config, out)
    cost = read_measure(out, COST_FILE)
    picture_files = [picture["file"] for picture in read_measure(out, PICTURES_FILE)]
    plot_accuracy(config, out, [config.stage1_name, *ARMS], LABELS, out / "accuracy.png")
    plot_headline(config, out, list(ARMS), SHORT, out / "headline.png")
    stage1_text = (
        f"Stage 1 ({config.stage1_steps} steps, full tokens): "
        + (
            "the scored questions themselves (`--from-base`)."
            if config.from_base
            else f"{config.stage1_captions} captions and {config.stage1_questions} {'/'.join(config.stage1_types)} "
            "questions on scenes of their own."
        )
        + f" Stage 2 ({config.stage2_steps} steps, {config.stage2_schedule} at {config.stage2_lr}, every arm from the "
        f"stage-1 model, the same data and seeds): {config.n_train} {'/'.join(config.question_types)} questions "
        f"(chance {config.chance():.1f}%). TCD and LCD reach the target "
        f"at {100 * (1 - config.hold):.0f}% of stage 2 and hold it."
    )
    sections = [
        "# epic demo: the EPIC experiment in miniature" + (" (--quick)" if config.quick else ""),
        *([quick_banner(config)] if config.quick else []),
        f"{measured_on()}. A tiny LLaVA "
        f"({config.num_layers}-layer Llama, hidden {config.hidden_size}; one-layer CLIP tower) on the built-in shapes "
        f"set: {full} visual tokens per image, compression before layer {config.layer}, budgets {config.budgets} "
        f"(the paper's 576/192/128/64/36 scaled to {full}). Test split: {config.n_test} questions. {stage1_text}",
        "## Headline (accuracy, %)",
        headline_table,
        "\n".join(check_lines),
        "![headline](headline.png)",
        "## Budget exposure: how much of stage 2 trained at the scored budget",
        exposure_table(config, out),
        f"## Accuracy at every budget ({config.train_method}, first seed, %)",
        per_budget(config, out),
        f"## Generalisation: trained with {config.train_method}, evaluated with every method (first seed, %)",
        generalisation(config, out),
        "![accuracy against kept tokens](accuracy.png)",
        "## Distillation: what there was to teach",
        "TCD's and LCD's teacher is the same model with milder compression; the gap is each model's own accuracy at "
        "full tokens over the budget on the test split.",
        kd_diagnostics(config, out),
        f"## Cost of each budget ({config.train_method}, batch of {cost['batch']} prompts, one thread, measured in "
        "this run)",
        "```\n" + cost["table"] + "\n```",
        f"## What the methods keep ({target} of {full} tokens; the SFT model, then the TCD model)",
        "\n".join(f"![kept tokens]({file})" for file in picture_files),
        "## Configuration",
        "```json\n" + json.dumps(config.as_dict(), indent=1) + "\n```",
        "Models in `models/`, their training logs in `models/*/log_history.json`, predictions in `eval/`. Re-run "
        "with the same `--out` to reuse the stage-1 model (and any finished run).",
    ]
    report = out / "report.md"
    report.write_text("\n\n".join(sections) + "\n")
    if config.quick:
        print(quick_banner(config).removeprefix("> ").replace("**", ""))
    print(headline_table)
    print("\n".join(check_lines))
    print(f"report: {report}")
    return report
