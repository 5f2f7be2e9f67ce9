"""How the demo runs its work: `epic train` / `epic eval` subprocesses, `workers` at a time with one thread each,
each skipped when the folder it must produce already exists; and the command lines of those runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from epic.demo.config import DemoConfig


@dataclass(frozen=True)
class Job:
    """One subprocess: a name (its log file and progress label), the command and the folder it must produce."""

    name: str
    command: list[str]
    produces: Path
    show_progress: bool = False  # let the job's own progress bar (stderr) through to the terminal


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


def _tee_stderr(command: list[str], out: IO[str], errors: Path) -> int:
    """Run `command` with stdout into `out` and stderr both to the terminal (its progress bar) and to `errors`."""
    with open(errors, "wb") as kept:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE, env=_environment())
        for chunk in iter(lambda: process.stderr.read1(4096), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            kept.write(chunk)
        return process.wait()


def epic_command(*arguments: str) -> list[str]:
    """`python -m epic.cli ARGUMENTS` with this interpreter."""
    return [sys.executable, "-m", "epic.cli", *arguments]


def train_options(config: DemoConfig, data: Path, output_dir: Path, seed: int, **options: object) -> list[str]:
    """The `epic train` options every demo run shares, overridden by `options` (`max_steps` among them)."""
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


def eval_job(
    config: DemoConfig, name: str, model: Path, test_file: Path, result: Path, methods: list[str], budgets: list[int]
) -> Job:
    """`epic eval` of `model` on the shapes questions of `test_file` with `methods` at `budgets`, into `result`
    (`grid.json`; with no methods, full tokens only: `metrics.json`)."""
    arguments = ["--task", "shapes", "--data", str(test_file), "--images", str(test_file.parent / "images")]
    if methods:
        arguments += ["--methods", ",".join(methods), "--tokens", ",".join(str(b) for b in budgets)]
        arguments += ["--layer", str(config.layer)]
    else:
        arguments += ["--method", "none"]  # every visual token (`epic eval` compresses by default)
    arguments += ["--batch-size", str(config.eval_batch_size), "--max-new-tokens", "3", "--out", str(result)]
    produces = result / ("grid.json" if methods else "metrics.json")
    return Job(name, epic_command("eval", str(model), *arguments), produces)


def as_json(value: dict[str, Any]) -> dict[str, Any]:
    """`value` as it reads back from JSON (tuples become lists), so settings compare equal to their record."""
    return json.loads(json.dumps(value))


def records(path: Path, settings: dict[str, Any]) -> bool:
    """Whether the JSON file `path` exists and records exactly `settings` (what a cached result was made with)."""
    return path.is_file() and json.loads(path.read_text()) == settings
