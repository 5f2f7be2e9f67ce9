"""`epic demo`: the paper's experiment in miniature on the built-in data.

Stages, each skipped when its result is already in the output folder (so an interrupted demo, or a second run
that only changes the comparison, picks up where it stopped):

1. draw the shapes set and build a tiny LLaVA from a config;
2. train the base model at full tokens (cached in `models/base`, keyed by every setting it depends on);
3. from the base, train every comparison model with the same steps and data: SFT at full tokens, direct SFT at
   the N/9 budget, TCD and LCD with DART, for each fine-tuning seed;
4. evaluate every model with every method at every budget, the base on blank images (the control), the cost of
   each budget, and the kept tokens on a few test images;
5. write `report.md` (see `epic.demo.report`).

Training and evaluation run as `epic train` / `epic eval` subprocesses, `workers` at a time with one thread each:
the two cores of a laptop-class machine are used by two processes (the base model by DDP over them).
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

COMPARISONS = ("sft", "direct", "tcd", "lcd")  # the models trained from the base, in the paper's table order
BASE_KEY_FILE = "demo-base.json"


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
        with open(log, "w") as out:
            errors = None if job.show_progress else subprocess.STDOUT
            result = subprocess.run(job.command, stdout=out, stderr=errors, env=_environment())
        if result.returncode != 0 or not job.produces.exists():
            tail = "\n".join(log.read_text().splitlines()[-25:])
            raise RuntimeError(f"{description}: {job.name} failed (exit {result.returncode}); log {log}:\n{tail}")
        return job

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=description, unit="run")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in as_completed([pool.submit(run, job) for job in todo]):
            bar.set_postfix_str(future.result().name)
            bar.update(1)
    bar.close()


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
    """The shapes set in `out/data` (drawn again only if its settings changed), the base model's training mix
    (questions and captions) and a blank image for the control."""
    data = out / "data"
    wanted = config.synth().__dict__ | {"question_types": list(config.question_types)}
    settings = data / "synth_config.json"
    if not settings.is_file() or json.loads(settings.read_text()) != wanted:
        if data.exists():
            shutil.rmtree(data)
        write_synthetic(data, config.synth())
    blank = data / "images" / "blank.png"
    if not blank.is_file():
        Image.new("RGB", (config.image_size, config.image_size), (222, 222, 222)).save(blank)
        rows = json.loads((data / "test.json").read_text())
        (data / "blank.json").write_text(json.dumps([row | {"image": "blank.png"} for row in rows], indent=1))
    mixed = data / "base_train.json"
    if not mixed.is_file():
        rows = json.loads((data / "train.json").read_text()) + json.loads((data / "captions.json").read_text())
        random.Random(config.seed).shuffle(rows)
        mixed.write_text(json.dumps(rows, indent=1))
    return data


def train_base(config: DemoConfig, data: Path, out: Path) -> Path:
    """The base model ("LLaVA-1.5" row): SFT at full tokens from random weights, tower and all. Cached."""
    base = out / "models" / "base"
    key = as_json(config.base_key())
    if (base / BASE_KEY_FILE).is_file() and json.loads((base / BASE_KEY_FILE).read_text()) == key:
        print(f"base model: reusing {base} (its settings match)")
        return base
    if base.exists():
        shutil.rmtree(base)
    init = out / "models" / "init"
    model, processor = build_tiny_llava_with_processor(vocabulary_texts(config.synth()), config.spec(), config.seed)
    save_llava(model, processor, init, config.template)
    run_dir = out / "runs" / "base"
    options = train_options(
        config,
        data,
        run_dir,
        config.seed,
        model=init,
        train_file=data / "base_train.json",  # the questions and the captions, shuffled
        mode="sft",
        freeze_vision_tower=False,
        max_steps=config.base_steps,
        learning_rate=config.base_lr,
        lr_scheduler_type=config.base_schedule,
        per_device_train_batch_size=config.batch_size // config.workers,
        ddp_backend="gloo",
        disable_tqdm=False,
    )
    if config.workers > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.workers}"]
        command = [*launcher, "-m", "epic.cli", "train", *options]
    else:
        command = epic_command("train", *options)
    print(f"base model: {config.base_steps} steps at full tokens on {config.workers} process(es); log in {out}/logs")
    run_jobs([Job("base", command, run_dir / "final", show_progress=True)], 1, out / "logs", "base model")
    shutil.move(run_dir / "final", base)
    (base / BASE_KEY_FILE).write_text(json.dumps(key, indent=1))
    return base


def comparison_jobs(config: DemoConfig, data: Path, out: Path, base: Path) -> list[Job]:
    """SFT (full), direct SFT at N/9, TCD and LCD from the base: same steps, data and learning rate, per seed."""
    jobs = []
    for index in range(config.fine_tune_seeds):
        seed = config.seed + index
        for kind in COMPARISONS:
            name = model_name(kind, index)
            options: dict[str, object] = {"mode": "sft" if kind in ("sft", "direct") else kind}
            if kind != "sft":
                options |= {"tokens": config.target_tokens, "method": config.train_method, "layer": config.layer}
            run_dir = out / "runs" / name
            arguments = train_options(
                config,
                data,
                run_dir,
                seed,
                model=base,
                max_steps=config.extra_steps,
                learning_rate=config.extra_lr,
                **options,
            )
            jobs.append(Job(name, epic_command("train", *arguments), run_dir / "final"))
    return jobs


def eval_job(
    config: DemoConfig, name: str, model: Path, test_file: Path, result: Path, methods: list[str], budgets: list[int]
) -> Job:
    """`epic eval` of `model` on the shapes questions of `test_file` with `methods` at `budgets`, into `result`."""
    arguments = ["--task", "shapes", "--data", str(test_file), "--images", str(test_file.parent / "images")]
    if methods:
        arguments += ["--methods", ",".join(methods), "--tokens", ",".join(str(b) for b in budgets)]
        arguments += ["--layer", str(config.layer)]
    arguments += ["--batch-size", str(config.eval_batch_size), "--max-new-tokens", "3", "--out", str(result)]
    produces = result / ("grid.json" if methods else "metrics.json")
    return Job(name, epic_command("eval", str(model), *arguments), produces)


def eval_jobs(config: DemoConfig, data: Path, out: Path, models: dict[str, Path]) -> list[Job]:
    """The full grid for the first seed's models and the base; the headline budget only for other seeds."""
    jobs = []
    for name, folder in models.items():
        headline_only = "-seed" in name
        budgets = [config.image_tokens, config.target_tokens] if headline_only else config.budgets
        methods = [config.train_method] if headline_only else list(config.methods)
        jobs.append(eval_job(config, f"eval-{name}", folder, data / "test.json", out / "eval" / name, methods, budgets))
    control = out / "eval" / "base-blank"  # full tokens only
    jobs.append(eval_job(config, "eval-base-blank", models["base"], data / "blank.json", control, [], []))
    return jobs


def run_demo(config: DemoConfig, out: Path) -> Path:
    """Every stage; returns the path of `report.md`."""
    from epic.demo.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(config, out)
    base = train_base(config, data, out)
    _forget_stale_comparisons(config, out, base)
    jobs = comparison_jobs(config, data, out, base)
    run_jobs(jobs, config.workers, out / "logs", "comparison models")
    models = {"base": base}
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


def _forget_stale_comparisons(config: DemoConfig, out: Path, base: Path) -> None:
    """Comparison models and evaluations of another configuration or another base model are deleted, never
    reported: they are kept only while `config.json` (and the base model's settings) match this run."""
    settings = as_json(config.as_dict()) | {"base": json.loads((base / BASE_KEY_FILE).read_text())}
    for volatile in ("workers", "eval_batch_size", "pictures"):
        settings.pop(volatile)
    record = out / "config.json"
    if record.is_file() and json.loads(record.read_text()) == settings:
        return
    for folder in [*(out / "runs").glob("*"), *(out / "models").glob("*"), out / "eval"]:
        if folder.name not in ("base", "init") and folder.is_dir():
            shutil.rmtree(folder)
    record.write_text(json.dumps(settings, indent=1))


def read_log(model: Path) -> list[dict]:
    """The training log saved beside a model by `epic train` (empty if there is none)."""
    path = model / LOG_FILE
    return json.loads(path.read_text()) if path.is_file() else []
