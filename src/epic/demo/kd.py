"""`epic demo --kd`: LLaVA-KD's ablation in miniature (PT-SFT against DPT-SFT-DFT) on the built-in data.

The teacher is the `--from-base` model (stage 1 on the scored questions at full tokens, cached); the student is a
narrower, shallower LLaVA that shares the teacher's tokenizer and, as in LLaVA-KD, its vision tower (copied, then
frozen). Both arms train the same student from the same initialisation for the same number of steps on the same
questions:

- `pt-sft` (without KD): PT (the projector alone, cross-entropy), then SFT (projector and LLM), in two runs whose
  steps and rates match the other arm's SFT and DFT;
- `dpt-sft-dft` (LLaVA-KD): DPT (the projector, CE + MDist + RDist against the teacher), SFT, then DFT
  (projector and LLM, CE + MDist + RDist).

Everything lives in `OUT/kd/`: the runs, their evaluations (`eval/`), their training logs
(`measures/training-logs.json`) and `kd-report.md`, rendered from those files by `epic.demo.kd_report`; results
of other settings are deleted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from epic.data.shapes import vocabulary_texts
from epic.demo.config import KD_ARMS, DemoConfig
from epic.demo.jobs import Job, as_json, epic_command, eval_job, records, run_jobs, train_options
from epic.demo.kd_report import write_kd_report
from epic.demo.measure import training_logs, write_json
from epic.demo.results import LOGS_FILE, MEASURES
from epic.demo.training import STAGE1_KEY_FILE, prepare_data, train_stage1
from epic.models.factory import build_tiny_llava_with_processor, save_llava
from epic.models.loading import load_llava_model


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
    if (folder / "config.json").is_file():
        return folder
    model, processor = build_tiny_llava_with_processor(
        vocabulary_texts(config.synth()), config.kd_student_spec(), config.seed
    )
    tower = load_llava_model(teacher).model.vision_tower
    model.model.vision_tower.load_state_dict(tower.state_dict())
    save_llava(model, processor, folder, config.template)
    return folder


def _forget_stale(config: DemoConfig, kd: Path, base_key: dict) -> None:
    """Delete `kd` unless its `config.json` records these settings and this base model; then record them."""
    settings = {"kd": as_json(config.kd_key()), "base": base_key}
    record = kd / "config.json"
    if records(record, settings):
        return
    if kd.exists():
        shutil.rmtree(kd)
    kd.mkdir(parents=True)
    record.write_text(json.dumps(settings, indent=1))


def run_kd_demo(config: DemoConfig, out: Path) -> Path:
    """The data and the base model (the teacher) as `epic demo --from-base` makes them (cached alike), then both
    arms from one student initialisation, their evaluation and the teacher's, their training logs; returns the
    path of `kd/kd-report.md`."""
    if not config.from_base:
        raise ValueError("the --kd teacher is the --from-base model: use demo_config(from_base=True)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(config, out)
    teacher = train_stage1(config, data, out)
    kd = out / "kd"
    _forget_stale(config, kd, json.loads((teacher / STAGE1_KEY_FILE).read_text()))
    start = student_init(config, teacher, kd / "models" / "init")
    latest = {arm: start for arm in KD_ARMS}
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
    models = {"teacher": teacher} | {arm: latest[arm] for arm in KD_ARMS}
    methods, test_file = [config.train_method], data / "test.json"
    evals = [
        eval_job(config, f"kd-eval-{name}", folder, test_file, kd / "eval" / name, methods, config.budgets)
        for name, folder in models.items()
    ]
    run_jobs(evals, config.workers, kd / "logs", "LLaVA-KD evaluation")
    write_json(kd / MEASURES / LOGS_FILE, training_logs({run: run_dir / "final" for run, run_dir in run_dirs.items()}))
    return write_kd_report(config, kd)
