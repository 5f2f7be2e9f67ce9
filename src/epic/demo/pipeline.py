"""`epic demo`: the paper's experiment in miniature on the built-in data, as a straight line of stages.

1. data (`epic.demo.training.prepare_data`): the shapes set, the scored questions for stage 2, captions and other
   questions for stage 1, a blank image for the control;
2. stage 1 at full tokens (`train_stage1`): the model learns to see and to speak, cached in `models/stage1` and
   keyed by every setting it depends on; it must still be weak on the scored question;
3. stage 2 (`train_stage2`), from that one checkpoint, every arm with the same data, steps, rate schedule and
   seeds: SFT at full tokens, direct training at the N/9 budget, TCD, TCD without distillation (alpha = 0) and
   LCD, with DART;
4. measures (`epic.demo.measure.measure_all`): every model with every method at every budget, the stage-1 model
   on its own questions, the SFT model on blank images, then the budget exposure, training logs, kept-token
   pictures and cost of each budget, each into a file;
5. `report.md` (`epic.demo.report.write_report`), rendered from those files alone.

Each stage skips what is already in the output folder and still matches the settings. Training and evaluation run
as `epic train` / `epic eval` subprocesses, `workers` at a time with one thread each: the two cores of a
laptop-class machine are used by two processes (stage 1 by DDP over them).
"""

from __future__ import annotations

from pathlib import Path

from epic.demo.config import DemoConfig
from epic.demo.measure import measure_all
from epic.demo.report import write_report
from epic.demo.training import prepare_data, train_stage1, train_stage2


def run_demo(config: DemoConfig, out: Path) -> Path:
    """Every stage; returns the path of `report.md`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(config, out)
    stage1 = train_stage1(config, data, out)
    models = train_stage2(config, data, out, stage1)
    measure_all(config, data, out, models)
    return write_report(config, out)
