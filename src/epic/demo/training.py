"""The demo's training stages: the shapes data, the stage-1 model (cached) and every stage-2 arm from it.

Each stage skips what is already in the output folder and still matches the settings, so an interrupted demo, or a
second run that only changes stage 2, picks up where it stopped; results of other settings are deleted.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

from PIL import Image

from epic.data.shapes import SynthConfig, vocabulary_texts, write_synthetic
from epic.demo.config import DemoConfig, arm_runs
from epic.demo.jobs import Job, as_json, epic_command, records, run_jobs, train_options
from epic.models.factory import build_tiny_llava_with_processor, save_llava

STAGE1_KEY_FILE = "demo-stage1.json"
VOLATILE_SETTINGS = ("workers", "eval_batch_size", "pictures")  # change no trained model or evaluation


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


def _draw(folder: Path, synth: SynthConfig, keep: tuple[str, ...] = ()) -> None:
    """Draw `synth` into `folder` unless the settings recorded there match; `keep` names sub-folders to leave."""
    wanted = as_json(synth.__dict__)
    settings = folder / "synth_config.json"
    if records(settings, wanted):
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
    """The stage-1 model: SFT at full tokens from random weights, tower and all, on stage 1's data. Cached in
    `out/models/<stage1_name>` with the settings it depends on."""
    model_dir = out / "models" / config.stage1_name
    key = as_json(config.stage1_key())
    if records(model_dir / STAGE1_KEY_FILE, key):
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


def train_stage2(config: DemoConfig, data: Path, out: Path, stage1: Path) -> dict[str, Path]:
    """Every stage-2 run (after forgetting those of other settings), copied to `out/models/<name>`; returns the
    stage-1 model and every stage-2 model by name."""
    forget_stale_runs(config, out, stage1)
    jobs = stage2_jobs(config, data, out, stage1)
    run_jobs(jobs, config.workers, out / "logs", "stage 2")
    models = {config.stage1_name: stage1}
    for job in jobs:
        target = out / "models" / job.name
        if not target.exists():
            shutil.copytree(job.produces, target)
        models[job.name] = target
    return models


def forget_stale_runs(config: DemoConfig, out: Path, stage1: Path) -> None:
    """Stage-2 models and evaluations of another configuration or another stage-1 model are deleted, never
    reported: they are kept only while `config.json` (and the stage-1 model's settings) match this run."""
    settings = as_json(config.as_dict()) | {"stage1": json.loads((stage1 / STAGE1_KEY_FILE).read_text())}
    for volatile in VOLATILE_SETTINGS:
        settings.pop(volatile)
    record = out / "config.json"
    if records(record, settings):
        return
    for folder in [*(out / "runs").glob("*"), *(out / "models").glob("*"), out / "eval"]:
        if folder.name not in ("stage1", "base", "init") and folder.is_dir():
            shutil.rmtree(folder)
    record.write_text(json.dumps(settings, indent=1))
