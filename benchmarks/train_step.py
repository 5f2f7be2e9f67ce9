"""Training-step cost of SFT, TCD and LCD, and of a step in the style of the released EPIC code, in one run.

The same batch for every configuration; each timed step is forward(s) + backward + AdamW step. Configurations are
timed round-robin (so drift of the machine hits all alike) and reported as medians, and as ratios to SFT at full
tokens and to SFT at the student's budget taken within each round (the median over rounds). Peak memory is
measured per configuration in a fresh subprocess (the resident-set size sampled every millisecond during one step,
above what the process held before that step).

    OMP_NUM_THREADS=1 python benchmarks/train_step.py

"SFT, student budget, supervised rows" is the student pass of TCD's end point alone: SFT at 64 tokens that projects
logits, and runs the last layer's MLP, at the supervised positions only (as the consistency step does); TCD minus it
is what the teacher costs.

Points of the schedule: the end (student 64 tokens, teacher 128) and the middle (student 288, teacher all) for TCD;
for LCD at 64 tokens, the end (student layer K=2, teacher layer 4) and the middle (student layer 4, teacher 6).
"Released-style" reruns the whole model (vision tower included) for the teacher, scatters both logit tensors back
to full length and takes a full-vocabulary fp32 KL over every position.

FLOPs (forward + backward, torch's `FlopCounterMode`) are counted once per configuration with eager attention, which
computes the same arithmetic as sdpa and which the counter can see.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import epic
from epic.distill import StepPlan, ce_rows, distilled_positions
from epic.eval.memory import memory_growth_during
from epic.labels import IGNORE_INDEX
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from epic.train.consistency import ConsistencyStep
from epic.train.step import Compressor, StepContext

SPEC = TinyLlavaSpec(
    vocab_size=4000,
    hidden_size=512,
    intermediate_size=1408,
    num_layers=8,
    num_heads=8,
    num_kv_heads=8,
    image_size=336,
    patch_size=14,
    vision_hidden_size=64,
    vision_layers=2,
    vision_heads=2,
)
IMAGE = SPEC.image_tokens  # 576
CONFIGS = [
    "sft_full",
    "sft_student",
    "sft_student_rows",
    "tcd_end",
    "tcd_middle",
    "lcd_end",
    "lcd_middle",
    "released_end",
    "released_middle",
]


def make_batch(rows: int, prompt: int, answer: int) -> dict[str, torch.Tensor]:
    """Rows of BOS, 5 text tokens, one image, `prompt` question tokens and an `answer` (the supervised part)."""
    generator = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(3, SPEC.image_token_id, (rows, n), generator=generator)  # noqa: E731
    input_ids = torch.cat(
        [
            torch.ones(rows, 1, dtype=torch.long),
            text(5),
            torch.full((rows, IMAGE), SPEC.image_token_id),
            text(prompt),
            text(answer),
        ],
        dim=1,
    )
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -answer:] = input_ids[:, -answer:]
    pixel_values = torch.randn(rows, 3, SPEC.image_size, SPEC.image_size, generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": pixel_values,
    }


def ratio(tokens: int) -> float:
    return 1.0 - tokens / IMAGE


def plans(layers: int) -> dict[str, StepPlan]:
    end, middle = ratio(64), ratio(288)
    return {
        "tcd_end": StepPlan(end, 2, ratio(128), 2, layers),
        "tcd_middle": StepPlan(middle, 2, 0.0, 2, layers),
        "lcd_end": StepPlan(end, 2, end, 4, layers),
        "lcd_middle": StepPlan(end, 4, end, 6, layers),
        "released_end": StepPlan(end, 2, ratio(128), 2, layers),
        "released_middle": StepPlan(middle, 2, 0.0, 2, layers),
    }


def released_style(model, batch, plan: StepPlan, method: str, alpha: float) -> torch.Tensor:
    """A step as the released code does it: a second full model call for the teacher (vision rerun), both logit
    tensors scattered back to full length, a full-vocabulary fp32 KL over every position (its labels[t] test)."""
    length = batch["input_ids"].shape[1]
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def full_length(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = logits.new_zeros(logits.shape[0], length, logits.shape[-1])
        index = positions.clamp(min=0)[..., None].expand_as(logits)
        return out.scatter(1, index, logits * (positions >= 0)[..., None])

    with torch.no_grad(), epic.compress(model, method, ratio=plan.teacher_ratio, layer=plan.teacher_layer) as teacher:
        teacher_logits = full_length(model(**inputs).logits, teacher.original_positions)
    student = epic.compress(model, method, ratio=plan.student_ratio, layer=plan.student_layer)
    out = model(**batch)
    student_logits = full_length(out.logits, student.original_positions)
    teacher_log = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (teacher_log.exp() * (teacher_log - F.log_softmax(student_logits.float(), dim=-1))).sum(-1)
    mask = batch["labels"] != IGNORE_INDEX
    loss = alpha * (kl * mask).sum() / mask.sum() + (1 - alpha) * out.loss
    loss.backward()
    student.remove()
    return loss


def step_function(name: str, model, batch, method: str) -> Callable[[], None]:
    """One training step of configuration `name` (forward(s) + backward; the caller steps the optimizer)."""
    layers = SPEC.num_layers
    if name == "sft_full":
        return lambda: model(**batch).loss.backward()
    if name == "sft_student":

        def sft_student() -> None:
            with epic.compress(model, method, tokens=64, layer=2):
                model(**batch).loss.backward()

        return sft_student
    if name == "sft_student_rows":
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        wanted = distilled_positions(batch["labels"])
        targets = batch["labels"][:, 1:][wanted[:, :-1]]

        def sft_student_rows() -> None:
            with epic.compress(model, method, tokens=64, layer=2, trim_last_layer=True):
                ce_rows(model(**inputs, logits_to_keep=wanted).logits, targets).backward()

        return sft_student_rows
    plan = plans(layers)[name]
    if name.startswith("released"):
        return lambda: released_style(model, batch, plan, method, alpha=0.5)
    step = ConsistencyStep(Compressor(method), alpha=0.5)
    context = StepContext(model, plan, seed=0)

    def consistency() -> None:
        result = step(model, batch, context)
        result.loss.backward()
        result.student.remove()

    return consistency


def setup(method: str, rows: int, prompt: int, answer: int, attn: str = "sdpa"):
    model = build_tiny_llava(SPEC, attn_implementation=attn).train()
    model.model.vision_tower.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer, make_batch(rows, prompt, answer)


def step_flops(model, steps: dict[str, Callable[[], None]], attn: str) -> dict[str, float]:
    """FLOPs of each step (forward(s) + backward) by torch's counter, with eager attention: the counter does not see
    CPU flash attention, and the arithmetic is the same."""
    model.set_attn_implementation("eager")
    flops = {}
    for name, step in steps.items():
        with FlopCounterMode(display=False) as counter:
            step()
        model.zero_grad(set_to_none=True)
        flops[name] = counter.get_total_flops()
    model.set_attn_implementation(attn)
    return flops


def peak_memory(name: str, args) -> float:
    """MB above the pre-step resident set during one step (after a warm-up step), in this process."""
    model, optimizer, batch = setup(args.method, args.rows, args.prompt, args.answer, args.attn)
    step = step_function(name, model, batch, args.method)
    step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    def measured_step() -> None:
        step()
        optimizer.step()

    return memory_growth_during(measured_step, torch.device("cpu")) / 2**20


def round_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of `name`'s time over `reference`'s in the same round (nan without the reference)."""
    if reference not in times:
        return float("nan")
    return statistics.median(mine / theirs for mine, theirs in zip(times[name], times[reference], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="dart")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=200, help="question tokens per row")
    parser.add_argument("--answer", type=int, default=60, help="answer tokens per row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attn", default="sdpa", help="eager or sdpa")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.memory_of:
        print(json.dumps({"peak_mb": peak_memory(args.memory_of, args)}))
        return

    configs = args.configs.split(",")
    model, optimizer, batch = setup(args.method, args.rows, args.prompt, args.answer, args.attn)
    steps = {name: step_function(name, model, batch, args.method) for name in configs}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for round_index in range(args.repeats + 1):  # the first round warms up
        for name in configs:
            start = time.perf_counter()
            steps[name]()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_index:
                times[name].append(time.perf_counter() - start)
    flops = step_flops(model, steps, args.attn)
    memory = {}
    for name in configs:
        command = [
            sys.executable,
            __file__,
            "--memory-of",
            name,
            "--method",
            args.method,
            "--rows",
            str(args.rows),
            "--prompt",
            str(args.prompt),
            "--answer",
            str(args.answer),
            "--attn",
            args.attn,
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        memory[name] = json.loads(output.strip().splitlines()[-1])["peak_mb"]

    median = {name: statistics.median(values) for name, values in times.items()}
    length = batch["input_ids"].shape[1]
    print(
        f"# train step: 8-layer 512-wide Llama-LLaVA, vocab {SPEC.vocab_size}, {args.rows} rows of {length} tokens "
        f"({IMAGE} visual), K=2, {args.method}, {args.attn}, one thread, median of {args.repeats}"
    )
    print(
        f"{'config':<17} {'ms':>8} {'x SFT full':>11} {'x SFT student':>14} {'peak MB':>9} {'GFLOP':>7} "
        f"{'x SFT full':>11}"
    )
    ratios = {name: round_ratio(times, name, "sft_full") for name in configs}
    for name in configs:
        full = ratios[name]
        student = round_ratio(times, name, "sft_student")
        flops_full = flops[name] / flops["sft_full"] if "sft_full" in flops else float("nan")
        print(
            f"{name:<17} {median[name] * 1e3:>8.1f} {full:>11.3f} {student:>14.3f} {memory[name]:>9.1f} "
            f"{flops[name] / 1e9:>7.1f} {flops_full:>11.3f}"
        )
    if args.json:
        results = {"args": vars(args), "median_s": median, "x_sft_full": ratios, "peak_mb": memory, "flops": flops}
        results["times"] = times
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
