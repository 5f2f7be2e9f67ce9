"""`epic demo --kd`: LLaVA-KD's ablation in miniature (PT-SFT against DPT-SFT-DFT) on the built-in data.

The teacher is the `--from-base` model (stage 1 on the scored questions at full tokens, cached); the student is a
narrower, shallower LLaVA that shares the teacher's tokenizer and, as in LLaVA-KD, its vision tower (copied, then
frozen). Both arms train the same student from the same initialisation for the same number of steps on the same
questions:

- `pt-sft` (without KD): PT (the projector alone, cross-entropy), then SFT (projector and LLM), in two runs whose
  steps and rates match the other arm's SFT and DFT;
- `dpt-sft-dft` (LLaVA-KD): DPT (the projector, CE + MDist + RDist against the teacher), SFT, then DFT
  (projector and LLM, CE + MDist + RDist).

Everything lives in `OUT/kd/` and `kd-report.md` is written there; results of other settings are deleted.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from epic.data.shapes import vocabulary_texts
from epic.demo.config import DemoConfig
from epic.demo.pipeline import (
    STAGE1_KEY_FILE,
    Job,
    as_json,
    epic_command,
    eval_job,
    prepare_data,
    read_log,
    run_jobs,
    train_options,
    train_stage1,
)
from epic.demo.results import accuracy, quick_banner, read_grid
from epic.models.factory import build_tiny_llava_with_processor, save_llava

ARMS = ("pt-sft", "dpt-sft-dft")
LABELS = {
    "teacher": "teacher (the --from-base base)",
    "pt-sft": "student, PT-SFT (no KD)",
    "dpt-sft-dft": "student, DPT-SFT-DFT (LLaVA-KD)",
}


@dataclass(frozen=True)
class Stage:
    """One `epic train` run of an arm: its name, mode, steps, rate schedule and what it trains against."""

    arm: str
    name: str
    mode: str
    steps: int
    learning_rate: float
    schedule: str = "cosine"
    freeze_language_model: bool = False
    teacher: bool = False


def stages(config: DemoConfig) -> list[list[Stage]]:
    """The runs in rounds, one run per arm each: the arms share steps, rates and schedules, and differ only in the
    teacher's losses (PT-SFT's last stage is SFT continued, LLaVA-KD's is DFT)."""
    pt, sft, last = config.kd_pt_steps, config.kd_sft_steps, config.kd_dft_steps
    sft_schedule = config.stage1_schedule  # the student's LLM learns the task from random weights, as the base did
    return [
        [
            Stage("pt-sft", "pt", "sft", pt, config.kd_pt_lr, freeze_language_model=True),
            Stage("dpt-sft-dft", "dpt", "kd-pretrain", pt, config.kd_pt_lr, teacher=True),
        ],
        [
            Stage("pt-sft", "sft", "sft", sft, config.kd_lr, sft_schedule),
            Stage("dpt-sft-dft", "sft", "sft", sft, config.kd_lr, sft_schedule),
        ],
        [
            Stage("pt-sft", "sft-end", "sft", last, config.kd_lr),
            Stage("dpt-sft-dft", "dft", "kd-finetune", last, config.kd_lr, teacher=True),
        ],
    ]


def student_init(config: DemoConfig, teacher: Path, folder: Path) -> Path:
    """The student at initialisation: `config.kd_student_spec()` with the teacher's tokenizer and vision tower."""
    from transformers import LlavaForConditionalGeneration

    if (folder / "config.json").is_file():
        return folder
    model, processor = build_tiny_llava_with_processor(
        vocabulary_texts(config.synth()), config.kd_student_spec(), config.seed
    )
    tower = LlavaForConditionalGeneration.from_pretrained(teacher).model.vision_tower
    model.model.vision_tower.load_state_dict(tower.state_dict())
    save_llava(model, processor, folder, config.template)
    return folder


def _forget_stale(config: DemoConfig, kd: Path, base_key: dict) -> None:
    settings = {"kd": as_json(config.kd_key()), "base": base_key}
    record = kd / "config.json"
    if record.is_file() and json.loads(record.read_text()) == settings:
        return
    if kd.exists():
        shutil.rmtree(kd)
    kd.mkdir(parents=True)
    record.write_text(json.dumps(settings, indent=1))


def run_kd_demo(config: DemoConfig, out: Path) -> Path:
    """The data and the base model (the teacher) as `epic demo --from-base` makes them (cached alike), then both
    arms from one student initialisation, their evaluation and the teacher's; returns the path of
    `kd/kd-report.md`."""
    if not config.from_base:
        raise ValueError("the --kd teacher is the --from-base model: use demo_config(from_base=True)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(config, out)
    teacher = train_stage1(config, data, out)
    kd = out / "kd"
    _forget_stale(config, kd, json.loads((teacher / STAGE1_KEY_FILE).read_text()))
    start = student_init(config, teacher, kd / "models" / "init")
    latest = {arm: start for arm in ARMS}
    rounds = stages(config)
    run_dirs: dict[str, Path] = {}  # every stage's run, in order: its name, its folder
    for index, round_ in enumerate(rounds):
        jobs = []
        for stage in round_:
            run = f"{stage.arm}-{stage.name}"
            run_dir = run_dirs[run] = kd / "runs" / run
            options: dict[str, object] = {
                "model": latest[stage.arm],
                "mode": stage.mode,
                "max_steps": stage.steps,
                "learning_rate": stage.learning_rate,
                "lr_scheduler_type": stage.schedule,
                "freeze_language_model": stage.freeze_language_model,
            }
            if stage.teacher:
                options |= {"teacher": teacher, "kd_weights": config.kd_weights}
            arguments = train_options(config, data, run_dir, config.seed, **options)
            jobs.append(Job(f"kd-{run}", epic_command("train", *arguments), run_dir / "final"))
            latest[stage.arm] = run_dir / "final"
        run_jobs(jobs, config.workers, kd / "logs", f"LLaVA-KD round {index + 1} of {len(rounds)}")
    models = {"teacher": teacher} | {arm: latest[arm] for arm in ARMS}
    methods, test_file = [config.train_method], data / "test.json"
    evals = [
        eval_job(config, f"kd-eval-{name}", folder, test_file, kd / "eval" / name, methods, config.budgets)
        for name, folder in models.items()
    ]
    run_jobs(evals, config.workers, kd / "logs", "LLaVA-KD evaluation")
    logs = {run: read_log(run_dir / "final") for run, run_dir in run_dirs.items()}
    return write_kd_report(config, kd, logs)


def write_kd_report(config: DemoConfig, kd: Path, logs: dict[str, list[dict]]) -> Path:
    """Write `kd-report.md` for `epic demo --kd` (LLaVA-KD's PT-SFT against DPT-SFT-DFT) and print its headline."""
    full, target, method = config.image_tokens, config.target_tokens, config.train_method
    types = list(config.question_types)
    grids = {name: read_grid(kd, name) for name in ("teacher", *ARMS)}
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
        parts = [key for key in ("loss", *(f"{p}_loss" for p in ("ce", "res", "vis", "rel"))) if key in entries[0]]
        text = ", ".join(f"{key} {entries[0][key]:.3f} -> {entries[-1][key]:.3f}" for key in parts) or "-"
        steps = log[-1].get("step", "-") if log else "-"
        losses.append(f"| {run} | {steps} | {text} |")
    teacher = accuracy(grids["teacher"], method, full, full)
    without, with_kd = (accuracy(grids[arm], method, full, full) for arm in ARMS)
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
        f"Measured on {platform.node()} ({platform.machine()}, {platform.python_version()}, torch "
        f"{torch.__version__}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Teacher: the --from-base "
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
