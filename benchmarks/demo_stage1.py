"""Does the demo's stage-1 recipe reach its bar on other seeds and process counts? Trains the stage-1 model the way
`epic demo` does (its own data, DDP over `--workers` processes, one thread each) for each seed, then scores it at
full tokens on its own questions (the bar: 90%) and on the scored question (it must stay near chance), into
OUT/stage1.md.

    OMP_NUM_THREADS=1 python benchmarks/demo_stage1.py --out stage1-seeds --seeds 1 2 --workers 1

Each seed is its own `epic demo` output folder (OUT/seed-<k>-workers-<w>), so a later `epic demo --out` on it
reuses the stage-1 model and the data. `--parallel 2` trains two one-process seeds at a time.
"""

from __future__ import annotations

import argparse
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from epic.demo import demo_config
from epic.demo.jobs import eval_job, run_jobs
from epic.demo.report import NEAR_CHANCE, STAGE1_BAR
from epic.demo.results import read_metrics
from epic.demo.training import prepare_data, stage1_files, train_stage1


def stage1_scores(seed: int, workers: int, out: Path) -> tuple[float, float]:
    """(accuracy on its own questions, on the scored question) of the stage-1 model of `seed`, trained here."""
    config = demo_config(seed=seed, workers=workers)
    data = prepare_data(config, out)
    model = train_stage1(config, data, out)
    for name in ("stage1-own", "stage1-scored"):  # scores of an earlier model in this folder are not this one's
        shutil.rmtree(out / "eval" / name, ignore_errors=True)
    own = eval_job(config, "own", model, stage1_files(config, data)[2], out / "eval" / "stage1-own", [], [])
    scored = eval_job(config, "scored", model, data / "test.json", out / "eval" / "stage1-scored", [], [])
    run_jobs([own, scored], 1, out / "logs", f"stage 1, seed {seed}: evaluation")
    return read_metrics(out, "stage1-own")["overall"], read_metrics(out, "stage1-scored")["overall"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("stage1-seeds"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="processes of each stage-1 run (DDP)")
    parser.add_argument("--parallel", type=int, default=1, help="seeds trained at a time")
    args = parser.parse_args()
    folders = {seed: args.out / f"seed-{seed}-workers-{args.workers}" for seed in args.seeds}
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        scored = pool.map(lambda seed: stage1_scores(seed, args.workers, folders[seed]), args.seeds)
        results = dict(zip(args.seeds, scored, strict=True))
    lines = [
        f"| seed | processes | own questions (bar {STAGE1_BAR:.0f}%) | scored question (near chance: <= "
        f"{NEAR_CHANCE:.0f}%) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for seed, (own, scored) in results.items():
        lines.append(f"| {seed} | {args.workers} | {own:.1f} | {scored:.1f} |")
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"stage1-workers-{args.workers}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
