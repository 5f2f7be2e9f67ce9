"""The demo's tuning grid: stage-2 arms with changed settings, from the demo's cached stage-1 model, scored at N/9
and N/16 with the training method, with each run's budget exposure, into OUT/grid/grid.md.

    OMP_NUM_THREADS=1 python benchmarks/demo_grid.py --out epic-demo \
        --points direct tcd tcd:hold=0.5 tcd:alpha=0.8 tcd:gap_max=0.1 tcd-nokd --seeds 0 1

A point is `ARM[:key=value,...]`: ARM one of the demo's arms (sft, direct, tcd, tcd-nokd, lcd); a key that is a
`DemoConfig` field (hold, stage2_steps, stage2_lr, tcd_r_max_start, ...) changes the demo's settings, any other
key is passed to `epic train` (alpha, gap_max, r_min_end, ...). Run `epic demo` first (with the same `--out`): the
grid reuses its data and stage-1 model. Finished points are reused; `workers` runs go at a time.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path

from epic.demo import demo_config
from epic.demo.config import ARMS, DemoConfig
from epic.demo.exposure import budget_exposure
from epic.demo.jobs import Job, epic_command, eval_job, run_jobs
from epic.demo.results import accuracy, read_grid
from epic.demo.training import stage2_arguments


def parse_point(text: str, config: DemoConfig) -> tuple[str, DemoConfig, dict[str, str]]:
    """`tcd:hold=0.5,alpha=0.8` -> (arm, settings with hold=0.5, {"alpha": "0.8"})."""
    arm, _, rest = text.partition(":")
    if arm not in ARMS:
        raise SystemExit(f"point {text!r}: the arm must be one of {ARMS}")
    names = {field.name: field.type for field in fields(DemoConfig)}
    changes, options = {}, {}
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        if key in names:
            changes[key] = None if value == "none" else type(getattr(config, key) or 0.0)(value)
        else:
            options[key] = value
    return arm, replace(config, **changes), options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("epic-demo"))
    parser.add_argument("--points", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    base = demo_config(workers=args.workers)
    data, grid = args.out / "data", args.out / "grid"
    stage1 = args.out / "models" / base.stage1_name
    if not (stage1 / "config.json").is_file():
        raise SystemExit(f"no stage-1 model in {stage1}: run `epic demo --out {args.out}` first")
    runs, evals, rows = [], [], []
    for text in args.points:
        arm, config, options = parse_point(text, base)
        for seed in args.seeds:
            name = f"{text.replace(':', '_').replace(',', '_').replace('=', '')}-s{seed}"
            arguments = stage2_arguments(config, data, grid, stage1, name, arm, config.seed + seed)
            for key, value in options.items():
                arguments += [f"--{key}", value]
            final = grid / "runs" / name / "final"
            runs.append(Job(name, epic_command("train", *arguments), final))
            budgets = [config.image_tokens, *config.headline_budgets]
            evals.append(eval_job(config, name, final, data / "test.json", grid / "eval" / name, ["dart"], budgets))
            rows.append((text, seed, name, config, arguments))
    run_jobs(runs, args.workers, grid / "logs", "grid runs")
    run_jobs(evals, args.workers, grid / "logs", "grid evaluation")
    lines = [
        "| point | seed | full | N/9 | N/16 | steps at N/9 | share of the rate at N/9 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for text, seed, name, config, arguments in rows:
        scores = read_grid(grid, name)
        at = [accuracy(scores, "dart", t, config.image_tokens) for t in (config.image_tokens, *config.headline_budgets)]
        seen = budget_exposure(arguments, config.num_layers, config.image_tokens, config.target_tokens)
        lines.append(
            f"| {text} | {seed} | " + " | ".join(f"{v:.1f}" for v in at) + f" | {seen.steps_at_budget} of "
            f"{seen.steps} | {100 * seen.lr_share_at_budget:.1f}% |"
        )
    table = "\n".join(lines)
    (grid / "grid.md").write_text(table + "\n")
    (grid / "grid.json").write_text(json.dumps([line for line in lines[2:]], indent=1))
    print(table)


if __name__ == "__main__":
    main()
