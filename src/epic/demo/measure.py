"""The demo's measuring stages: every evaluation, then what the report shows besides accuracy, each written to a
file in the output folder so that the report only renders:

- `eval/<model>/grid.json` and `metrics.json`: `epic eval` runs (skipped when present);
- `measures/exposure.json`: each first-seed arm's budget exposure, replayed from its own `epic train` options;
- `measures/training-logs.json`: every model's training log (`log_history.json`), by model name;
- `kept-<model>-<k>.png` and `measures/pictures.json`: what each method keeps on the first test images;
- `measures/cost.json`: FLOPs, KV cache and prefill time of each budget against full tokens, timed here.

Everything under `measures/` is measured again on every run (the timings are this machine's, now).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from epic.demo.config import DemoConfig, arm_runs
from epic.demo.exposure import budget_exposure
from epic.demo.jobs import Job, eval_job, run_jobs
from epic.demo.results import COST_FILE, EXPOSURE_FILE, LOGS_FILE, MEASURES, PICTURES_FILE
from epic.demo.training import stage1_files, stage2_arguments
from epic.eval.bench import format_bench, run_bench, synthetic_prompt
from epic.eval.show import draw_kept, kept_patches
from epic.models.loading import load_llava, load_llava_model
from epic.train.run import LOG_FILE

PICTURED = ("sft", "tcd")  # the models whose kept tokens are drawn
COST_BATCH, COST_TEXT_TOKENS, COST_REPEATS = 8, 30, 5  # the cost's prompt: 8 prompts of 30 text tokens, 5 timings


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


def measure_all(config: DemoConfig, data: Path, out: Path, models: dict[str, Path]) -> None:
    """Every evaluation and measurement the report reads, in the order the report used to take them."""
    run_jobs(eval_jobs(config, data, out, models), config.workers, out / "logs", "evaluation")
    write_json(out / MEASURES / EXPOSURE_FILE, exposures(config, data, out, models[config.stage1_name]))
    write_json(out / MEASURES / LOGS_FILE, training_logs(models))
    write_json(out / MEASURES / PICTURES_FILE, pictures(config, data, {name: models[name] for name in PICTURED}, out))
    write_json(out / MEASURES / COST_FILE, cost(config, models[config.stage1_name]))


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))


def exposures(config: DemoConfig, data: Path, out: Path, stage1: Path) -> dict[str, dict[str, Any]]:
    """Per arm (first seed), by model name: its budget exposure (`epic.demo.exposure.Exposure` as a dict) at the
    scored budget and layer."""
    result = {}
    for name, arm, seed in arm_runs(config):
        if name == arm:
            arguments = stage2_arguments(config, data, out, stage1, name, arm, seed)
            seen = budget_exposure(arguments, config.num_layers, config.image_tokens, config.target_tokens)
            result[name] = asdict(seen)
    return result


def read_log(model: Path) -> list[dict[str, Any]]:
    """The training log saved beside a model by `epic train` (empty if there is none)."""
    path = model / LOG_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def training_logs(models: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """Every model's training log, by name (in the order of `models`)."""
    return {name: read_log(folder) for name, folder in models.items()}


def pictures(config: DemoConfig, data: Path, models: dict[str, Path], out: Path) -> list[dict[str, Any]]:
    """Kept tokens of every method at N/9 on the first test images, for each of `models`: draws
    `out/kept-<model>-<k>.png` and returns, per picture, its file, item and what each method kept and answered."""
    items = json.loads((data / "test.json").read_text())[: config.pictures]
    drawn = []
    for name, folder in models.items():
        model, processor, template = load_llava(folder, template=config.template)
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
            drawn.append({"model": name, "file": path.name, "item": item, "kept": [asdict(one) for one in kept]})
    return drawn


def cost(config: DemoConfig, model_dir: Path) -> dict[str, Any]:
    """FLOPs (formula), KV cache (measured and formula) and prefill time of each budget against full tokens with
    the training method, measured here on one thread: the rows and their table (`epic.eval.bench.format_bench`)."""
    torch.set_num_threads(1)
    model = load_llava_model(model_dir)
    inputs = synthetic_prompt(model, text_tokens=COST_TEXT_TOKENS, batch=COST_BATCH, seed=config.seed)
    with torch.inference_mode():
        rows = run_bench(
            model, inputs, [config.train_method], config.budgets[1:], config.layer, COST_REPEATS, progress=False
        )
    table = format_bench(rows)
    return {"model": str(model_dir), "batch": COST_BATCH, "rows": [asdict(row) for row in rows], "table": table}
