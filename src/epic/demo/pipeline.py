"""`epic demo`: the paper's experiment in miniature on the built-in data.

Stages, each skipped when its result is already in the output folder (so an interrupted demo, or a second run
that only changes stage 2, picks up where it stopped):

1. draw the shapes set (the scored questions for stage 2, captions and other questions for stage 1) and build a
   tiny LLaVA from a config;
2. stage 1 at full tokens: the model learns to see and to speak (cached in `models/stage1`, keyed by every setting
   it depends on); it must still be weak on the scored question;
3. stage 2 from that one checkpoint, every arm with the same data, steps, rate schedule and seeds: SFT at full
   tokens, direct training at the N/9 budget, TCD, TCD without distillation (alpha = 0) and LCD, with DART;
4. evaluate every model with every method at every budget, the stage-1 model on its own questions, the SFT model
   on blank images (the control), the cost of each budget, and the kept tokens on a few test images;
5. write `report.md` (see `epic.demo.report`).

Training and evaluation run as `epic train` / `epic eval` subprocesses, `workers` at a time with one thread each:
the two cores of a laptop-class machine are used by two processes (stage 1 by DDP over them).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from epic.data.shapes import vocabulary_texts, write_synthetic
from epic.demo.config import DemoConfig
from epic.models.factory import build_tiny_llava_with_processor, save_llava
from epic.train.run import LOG_FILE

ARMS = ("sft", "direct", "tcd", "tcd-nokd", "lcd")  # stage 2, in the report's order
HEADLINE_ARMS = ("direct", "tcd", "tcd-nokd")  # trained with `config.seeds` seeds; the others with the first
STAGE1_KEY_FILE = "demo-stage1.json"


@dataclass(frozen=True)
class Job:
    """One subprocess: a name (its log file and progress label), the command and the folder it must produce."""

    name: str
    command: list[str]
    produces: Path
    show_progress: bool = False  # let the job's own progress bar (stderr) through to the terminal


def model_name(kind: str, seed_index: int) -> str:
    """`tcd` for the first fine-tuning seed, `tcd-seed2` for the second, ..."""
    return kind if seed_index == 0 else f"{kind}-seed{seed_index + 1}"


def _environment() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_jobs(jobs: list[Job], workers: int, logs: Path, description: str) -> None:
    """Run `jobs` as subprocesses, `workers` at a time, with a progress bar; a failure stops the demo with the
    tail of that job's log. Jobs whose output already exists are skipped."""
    todo = [job for job in jobs if not job.produces.exists()]
    logs.mkdir(parents=True, exist_ok=True)

    def run(job: Job) -> Job:
        log = logs / f"{job.name}.log"
        errors = logs / f"{job.name}.stderr.log"  # a job showing its progress: its stderr, also kept here
        with open(log, "w") as out:
            if job.show_progress:
                returncode = _tee_stderr(job.command, out, errors)
            else:
                returncode = subprocess.run(job.command, stdout=out, stderr=subprocess.STDOUT, env=_environment())
                returncode = returncode.returncode
        if returncode != 0 or not job.produces.exists():
            shown = errors if job.show_progress else log
            tail = "\n".join(shown.read_text(errors="replace").splitlines()[-25:])
            raise RuntimeError(f"{description}: {job.name} failed (exit {returncode}); log {shown}:\n{tail}")
        return job

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=description, unit="run")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in as_completed([pool.submit(run, job) for job in todo]):
            bar.set_postfix_str(future.result().name)
            bar.update(1)
    bar.close()


def _tee_stderr(command: list[str], out, errors: Path) -> int:
    """Run `command` with stdout into `out` and stderr both to the terminal (its progress bar) and to `errors`."""
    with open(errors, "wb") as kept:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE, env=_environment())
        for chunk in iter(lambda: process.stderr.read1(4096), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            kept.write(chunk)
        return process.wait()


def epic_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "epic.cli", *arguments]


def train_options(config: DemoConfig, data: Path, output_dir: Path, seed: int, **options: object) -> list[str]:
    common: dict[str, object] = {
        "train_file": data / "train.json",  # the questions, one conversation per scene
        "image_folder": data / "images",
        "max_length": 1024,
        "verify_images": False,
        "group_by_modality_length": False,
        "output_dir": output_dir,
        "per_device_train_batch_size": config.batch_size,
        "lr_scheduler_type": "cosine",
        "warmup_steps": config.warmup_ratio,
        "adam_beta2": config.adam_beta2,
        "weight_decay": 0.0,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": seed,
        "compression_seed": seed,
    }
    options.setdefault("logging_steps", max(1, min(25, int(options["max_steps"]) // 10)))  # a short run logs too
    arguments = []
    for key, value in (common | options).items():
        arguments += [f"--{key}", str(value)]
    return arguments


def prepare_data(config: DemoConfig, out: Path) -> Path:
    """The shapes set in `out/data` (drawn again only if its settings changed): the scored questions, stage 1's
    own set in `data/stage1` (or, `--from-base`, the scored training questions shuffled) and a blank image for
    the control."""
    data = out / "data"
    _draw(data, config.synth(), keep=("stage1",))
    if config.from_base:
        sources = [data / "train.json"]
    else:
        _draw(data / "stage1", config.stage1_synth())
        sources = [data / "stage1" / "train.json", data / "stage1" / "captions.json"]
    mixed = stage1_files(config, data)[0]
    if not mixed.is_file():  # drawn again with its folder whenever the settings change
        rows = [row for source in sources for row in json.loads(source.read_text())]
        random.Random(config.seed).shuffle(rows)
        mixed.write_text(json.dumps(rows, indent=1))
    blank = data / "images" / "blank.png"
    if not blank.is_file():
        Image.new("RGB", (config.image_size, config.image_size), (222, 222, 222)).save(blank)
        rows = json.loads((data / "test.json").read_text())
        (data / "blank.json").write_text(json.dumps([row | {"image": "blank.png"} for row in rows], indent=1))
    return data


def _draw(folder: Path, synth, keep: tuple[str, ...] = ()) -> None:
    """Draw `synth` into `folder` unless the settings recorded there match; `keep` names sub-folders to leave."""
    wanted = as_json(synth.__dict__)
    settings = folder / "synth_config.json"
    if settings.is_file() and json.loads(settings.read_text()) == wanted:
        return
    if folder.exists():
        for entry in folder.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    write_synthetic(folder, synth)


def stage1_files(config: DemoConfig, data: Path) -> tuple[Path, Path, Path]:
    """(training file, image folder, test file) of stage 1."""
    if config.from_base:
        return data / "base_train.json", data / "images", data / "test.json"
    return data / "stage1" / "mix.json", data / "stage1" / "images", data / "stage1" / "test.json"


def train_stage1(config: DemoConfig, data: Path, out: Path) -> Path:
    """The stage-1 model: SFT at full tokens from random weights, tower and all, on stage 1's data. Cached."""
    model_dir = out / "models" / config.stage1_name
    key = as_json(config.stage1_key())
    if (model_dir / STAGE1_KEY_FILE).is_file() and json.loads((model_dir / STAGE1_KEY_FILE).read_text()) == key:
        print(f"stage 1: reusing {model_dir} (its settings match)")
        return model_dir
    if model_dir.exists():
        shutil.rmtree(model_dir)
    init = out / "models" / "init"
    words = vocabulary_texts(config.synth() if config.from_base else config.stage1_synth())
    model, processor = build_tiny_llava_with_processor(words, config.spec(), config.seed)
    save_llava(model, processor, init, config.template)
    run_dir = out / "runs" / config.stage1_name
    train_file, images, _ = stage1_files(config, data)
    options = train_options(
        config,
        data,
        run_dir,
        config.seed,
        model=init,
        train_file=train_file,
        image_folder=images,
        mode="sft",
        freeze_vision_tower=False,
        max_steps=config.stage1_steps,
        learning_rate=config.stage1_lr,
        lr_scheduler_type=config.stage1_schedule,
        per_device_train_batch_size=config.batch_size // config.workers,
        disable_tqdm=False,
        **({"ddp_backend": "gloo"} if config.workers > 1 else {}),
    )
    if config.workers > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.workers}"]
        command = [*launcher, "-m", "epic.cli", "train", *options]
    else:
        command = epic_command("train", *options)
    print(f"stage 1: {config.stage1_steps} steps at full tokens on {config.workers} process(es); log in {out}/logs")
    run_jobs([Job(config.stage1_name, command, run_dir / "final", show_progress=True)], 1, out / "logs", "stage 1")
    shutil.move(run_dir / "final", model_dir)
    with open(out / "logs" / f"{config.stage1_name}.log", "a") as log:  # the log names run_dir: say where it went
        log.write(f"epic demo: moved {run_dir / 'final'} to {model_dir}, where the stage-1 model is\n")
    (model_dir / STAGE1_KEY_FILE).write_text(json.dumps(key, indent=1))
    return model_dir


def arm_options(config: DemoConfig, arm: str) -> dict[str, object]:
    """What an arm changes in stage 2: its mode, budget and schedules (everything else is shared)."""
    if arm == "sft":
        return {"mode": "sft"}
    options: dict[str, object] = {"tokens": config.target_tokens, "method": config.train_method, "layer": config.layer}
    if arm == "direct":
        return options | {"mode": "sft"}
    options |= {"schedule_hold": config.hold}
    if arm == "lcd":
        return options | {"mode": "lcd"}
    if config.hold > 0:  # the held part trains at the target itself, not in a range below it
        options["r_min_end"] = 1.0 - config.target_tokens / config.image_tokens
    if config.tcd_r_max_start is not None:
        options["r_max_start"] = config.tcd_r_max_start
    if arm == "tcd-nokd":
        options["alpha"] = 0.0
    return options | {"mode": "tcd"}


def arm_runs(config: DemoConfig) -> list[tuple[str, str, int]]:
    """(model name, arm, seed) of every stage-2 run: the headline arms on every seed, the others on the first."""
    runs = []
    for index in range(config.seeds):
        for arm in ARMS:
            if index == 0 or arm in HEADLINE_ARMS:
                runs.append((model_name(arm, index), arm, config.seed + index))
    return runs


def seed_names(config: DemoConfig, arm: str) -> list[str]:
    """The model names of `arm`'s runs, first seed first."""
    return [name for name, kind, _ in arm_runs(config) if kind == arm]


def stage2_arguments(
    config: DemoConfig, data: Path, out: Path, stage1: Path, name: str, arm: str, seed: int
) -> list[str]:
    """The `epic train` options of one stage-2 run."""
    return train_options(
        config,
        data,
        out / "runs" / name,
        seed,
        model=stage1,
        max_steps=config.stage2_steps,
        learning_rate=config.stage2_lr,
        lr_scheduler_type=config.stage2_schedule,
        **arm_options(config, arm),
    )


def stage2_jobs(config: DemoConfig, data: Path, out: Path, stage1: Path) -> list[Job]:
    """Every arm from the stage-1 model: same steps, data, rate schedule and seeds."""
    jobs = []
    for name, arm, seed in arm_runs(config):
        arguments = stage2_arguments(config, data, out, stage1, name, arm, seed)
        jobs.append(Job(name, epic_command("train", *arguments), out / "runs" / name / "final"))
    return jobs


def eval_job(
    config: DemoConfig, name: str, model: Path, test_file: Path, result: Path, methods: list[str], budgets: list[int]
) -> Job:
    """`epic eval` of `model` on the shapes questions of `test_file` with `methods` at `budgets`, into `result`."""
    arguments = ["--task", "shapes", "--data", str(test_file), "--images", str(test_file.parent / "images")]
    if methods:
        arguments += ["--methods", ",".join(methods), "--tokens", ",".join(str(b) for b in budgets)]
        arguments += ["--layer", str(config.layer)]
    else:
        arguments += ["--method", "none"]  # every visual token (`epic eval` compresses by default)
    arguments += ["--batch-size", str(config.eval_batch_size), "--max-new-tokens", "3", "--out", str(result)]
    produces = result / ("grid.json" if methods else "metrics.json")
    return Job(name, epic_command("eval", str(model), *arguments), produces)


def eval_jobs(config: DemoConfig, data: Path, out: Path, models: dict[str, Path]) -> list[Job]:
    """The full grid for the stage-1 model and each arm's first seed; the headline budgets (N/9, N/16) with the
    training method for later seeds; the stage-1 model on its own questions and the SFT model on blank images
    (full tokens only)."""
    jobs = []
    headline = [config.image_tokens, *config.headline_budgets]
    for name, folder in models.items():
        later_seed = "-seed" in name
        budgets = headline if later_seed else config.budgets
        methods = [config.train_method] if later_seed else list(config.methods)
        jobs.append(eval_job(config, f"eval-{name}", folder, data / "test.json", out / "eval" / name, methods, budgets))
    stage1 = config.stage1_name
    if not config.from_base:
        own = stage1_files(config, data)[2]
        jobs.append(eval_job(config, f"eval-{stage1}-own", models[stage1], own, out / "eval" / f"{stage1}-own", [], []))
    blank = out / "eval" / "sft-blank"
    jobs.append(eval_job(config, "eval-sft-blank", models["sft"], data / "blank.json", blank, [], []))
    return jobs


def run_demo(config: DemoConfig, out: Path) -> Path:
    """Every stage; returns the path of `report.md`."""
    from epic.demo.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(config, out)
    stage1 = train_stage1(config, data, out)
    _forget_stale_runs(config, out, stage1)
    jobs = stage2_jobs(config, data, out, stage1)
    run_jobs(jobs, config.workers, out / "logs", "stage 2")
    models = {config.stage1_name: stage1}
    for job in jobs:
        target = out / "models" / job.name
        if not target.exists():
            shutil.copytree(job.produces, target)
        models[job.name] = target
    run_jobs(eval_jobs(config, data, out, models), config.workers, out / "logs", "evaluation")
    return write_report(config, out, data, models)


def as_json(value: dict) -> dict:
    """`value` as it reads back from JSON (tuples become lists), so settings compare equal to their record."""
    return json.loads(json.dumps(value))


def _forget_stale_runs(config: DemoConfig, out: Path, stage1: Path) -> None:
    """Stage-2 models and evaluations of another configuration or another stage-1 model are deleted, never
    reported: they are kept only while `config.json` (and the stage-1 model's settings) match this run."""
    settings = as_json(config.as_dict()) | {"stage1": json.loads((stage1 / STAGE1_KEY_FILE).read_text())}
    for volatile in ("workers", "eval_batch_size", "pictures"):
        settings.pop(volatile)
    record = out / "config.json"
    if record.is_file() and json.loads(record.read_text()) == settings:
        return
    for folder in [*(out / "runs").glob("*"), *(out / "models").glob("*"), out / "eval"]:
        if folder.name not in ("stage1", "base", "init") and folder.is_dir():
            shutil.rmtree(folder)
    record.write_text(json.dumps(settings, indent=1))


def read_log(model: Path) -> list[dict]:
    """The training log saved beside a model by `epic train` (empty if there is none)."""
    path = model / LOG_FILE
    return json.loads(path.read_text()) if path.is_file() else []
