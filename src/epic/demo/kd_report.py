"""`kd-report.md` of `epic demo --kd`: LLaVA-KD's PT-SFT against DPT-SFT-DFT, rendered from the files the KD stages
wrote in `OUT/kd/` (`eval/<model>/grid.json`, `measures/training-logs.json`); a missing one stops it."""

from __future__ import annotations

import json
from pathlib import Path

from epic.demo.config import KD_ARMS, DemoConfig
from epic.demo.results import LOGS_FILE, accuracy, measured_on, quick_banner, read_grid, read_measure

LABELS = {
    "teacher": "teacher (the --from-base base)",
    "pt-sft": "student, PT-SFT (no KD)",
    "dpt-sft-dft": "student, DPT-SFT-DFT (LLaVA-KD)",
}
LOSS_PARTS = ("loss", *(f"{part}_loss" for part in ("ce", "res", "vis", "rel")))  # as `epic train` logs them


def write_kd_report(config: DemoConfig, kd: Path) -> Path:
    """Write `kd/kd-report.md` from the KD stages' files in `kd` and print its headline."""
    full, target, method = config.image_tokens, config.target_tokens, config.train_method
    types = list(config.question_types)
    grids = {name: read_grid(kd, name) for name in ("teacher", *KD_ARMS)}
    logs = read_measure(kd, LOGS_FILE)
    headline_table = [
        f"| model | full tokens ({full}) | {method} at {target} tokens | " + " | ".join(types) + " (full) |",
        "| --- | ---: | ---: |" + " ---: |" * len(types),
    ]
    for name, grid in grids.items():
        values = [accuracy(grid, method, full, full), accuracy(grid, method, target, full)]
        values += [accuracy(grid, method, full, full, kind) for kind in types]
        headline_table.append(f"| {LABELS[name]} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    budgets = ["| model | " + " | ".join(str(b) for b in config.budgets) + " |"]
    budgets.append("| --- |" + " ---: |" * len(config.budgets))
    for name, grid in grids.items():
        values = [accuracy(grid, method, tokens, full) for tokens in config.budgets]
        budgets.append(f"| {LABELS[name]} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    losses = ["| run | steps | loss parts (first log -> last log) |", "| --- | ---: | --- |"]
    for run, log in logs.items():
        entries = [entry for entry in log if "loss" in entry] or [{}]
        parts = [key for key in LOSS_PARTS if key in entries[0]]
        text = ", ".join(f"{key} {entries[0][key]:.3f} -> {entries[-1][key]:.3f}" for key in parts) or "-"
        steps = log[-1].get("step", "-") if log else "-"
        losses.append(f"| {run} | {steps} | {text} |")
    teacher = accuracy(grids["teacher"], method, full, full)
    without, with_kd = (accuracy(grids[arm], method, full, full) for arm in KD_ARMS)
    checks = [
        f"- Teacher at full tokens: {teacher:.1f}%; students: {without:.1f}% without KD (PT-SFT), {with_kd:.1f}% "
        f"with LLaVA-KD (DPT-SFT-DFT), a difference of {with_kd - without:+.1f} points (one seed: read it with the "
        "main demo's seed spread in mind).",
        f"- The teacher's advantage over the student without KD: {teacher - without:+.1f} points (what "
        "distillation can hand over).",
    ]
    spec = config.kd_student_spec()
    sections = [
        "# epic demo --kd: LLaVA-KD's ablation in miniature" + (" (--quick)" if config.quick else ""),
        *([quick_banner(config)] if config.quick else []),
        f"{measured_on()}. Teacher: the --from-base "
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
