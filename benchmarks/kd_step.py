"""Cost of a LLaVA-KD training step against an SFT step of the student alone, on the same batch, in one run.

Each timed step is forward(s) + backward + AdamW step of the student. Configurations are timed round-robin (drift of
the machine hits all alike), medians reported with ratios to the SFT step. Peak memory is measured per configuration
in a fresh process: on CPU the resident set above the pre-step level (sampled every millisecond during one step after
a warm-up step); on a GPU the allocator's peak during one step above what was allocated before it.

    OMP_NUM_THREADS=1 python benchmarks/kd_step.py                       # CPU preset (about 2 minutes, one thread)
    python benchmarks/kd_step.py --preset real --device cuda --dtype bfloat16 --attn sdpa

Configurations: `sft` (the student's own CE, full tokens), `kd` (kd-finetune: teacher forward at full tokens under
inference mode, student forward, CE + MDist + RDist), `teacher` (the teacher's forward of `kd` alone), `sft_64` and
`kd_tcd_64` (the student compressed to 64 visual tokens per image by DART at layer 2, the teacher at full tokens).
Random weights; the vision towers are tiny CLIP towers at 378 px / 14 (729 visual tokens per image, as
SigLIP-so400m-384), so the cost is the LLMs'.
Preset `real`: the student has Qwen1.5-0.5B's decoder shapes, the teacher Qwen1.5-4B's, vocabulary 151,936.
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

import epic
from epic.distill import StepPlan, distilled_positions
from epic.eval.memory import memory_growth_during
from epic.labels import IGNORE_INDEX
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from epic.train.kd import KDStep, KDWeights
from epic.train.step import Compressor, StepContext

VISION = {"image_size": 378, "patch_size": 14, "vision_hidden_size": 64, "vision_layers": 1, "vision_heads": 2}
PRESETS = {
    "cpu": (  # the student 256 wide, 6 layers; the teacher twice as wide and deeper, as 0.5B against 4B
        TinyLlavaSpec(
            text_model="qwen2", vocab_size=4000, hidden_size=256, intermediate_size=704, num_layers=6, **VISION
        ),
        TinyLlavaSpec(
            text_model="qwen2", vocab_size=4000, hidden_size=512, intermediate_size=1408, num_layers=10, **VISION
        ),
    ),
    "real": (  # Qwen1.5-0.5B and Qwen1.5-4B decoder shapes
        TinyLlavaSpec(
            text_model="qwen2",
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=2816,
            num_layers=24,
            num_heads=16,
            num_kv_heads=16,
            **VISION,
        ),
        TinyLlavaSpec(
            text_model="qwen2",
            vocab_size=151936,
            hidden_size=2560,
            intermediate_size=6912,
            num_layers=40,
            num_heads=20,
            num_kv_heads=20,
            **VISION,
        ),
    ),
}
CONFIGS = ["sft", "kd", "teacher", "sft_64", "kd_tcd_64"]
KEPT = 64


def make_batch(spec: TinyLlavaSpec, rows: int, prompt: int, answer: int, device: str) -> dict[str, torch.Tensor]:
    """Rows of BOS, 5 text tokens, one image, `prompt` question tokens and an `answer` (the supervised part)."""
    generator = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(3, 3000, (rows, n), generator=generator)  # noqa: E731
    image = torch.full((rows, spec.image_tokens), spec.image_token_id)
    input_ids = torch.cat([torch.ones(rows, 1, dtype=torch.long), text(5), image, text(prompt), text(answer)], dim=1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -answer:] = input_ids[:, -answer:]
    pixel_values = torch.randn(rows, 3, spec.image_size, spec.image_size, generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {key: value.to(device) for key, value in {**batch, "pixel_values": pixel_values}.items()}


def setup(args: argparse.Namespace):
    student_spec, teacher_spec = PRESETS[args.preset]
    dtype = getattr(torch, args.dtype)
    student = build_tiny_llava(student_spec, attn_implementation=args.attn, dtype=dtype).to(args.device).train()
    student.model.vision_tower.requires_grad_(False)
    teacher = build_tiny_llava(teacher_spec, seed=1, attn_implementation=args.attn, dtype=dtype).to(args.device)
    teacher.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    batch = make_batch(student_spec, args.rows, args.prompt, args.answer, args.device)
    return student, teacher, optimizer, batch


def step_function(name: str, student, teacher, batch, vocab: int) -> Callable[[], None]:
    """One training step of configuration `name` (forward(s) + backward; the caller steps the optimizer)."""
    layers = student.config.text_config.num_hidden_layers
    ratio = 1.0 - KEPT / student.config.image_seq_length
    if name == "sft":
        return lambda: student(**batch).loss.backward()
    if name == "teacher":  # the teacher's part of `kd` alone: its forward, logits at the response + visual rows
        wanted = distilled_positions(batch["labels"]) | (batch["input_ids"] == student.config.image_token_id)
        inputs = {key: value for key, value in batch.items() if key != "labels"}

        def teacher_forward() -> None:
            with torch.inference_mode():
                teacher(**inputs, logits_to_keep=wanted)

        return teacher_forward
    if name == "sft_64":

        def compressed_sft() -> None:
            with epic.compress(student, "dart", tokens=KEPT, layer=2):
                student(**batch).loss.backward()

        return compressed_sft
    plan = StepPlan(ratio if name == "kd_tcd_64" else None, 2, None, layers, layers)
    step = KDStep(teacher, KDWeights(), vocab, Compressor("dart"))
    context = StepContext(student, plan, seed=0)

    def kd() -> None:
        result = step(student, batch, context)
        result.loss.backward()
        if result.student is not None:
            result.student.remove()

    return kd


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(name: str, args: argparse.Namespace) -> float:
    """MB above the pre-step level during one step (after a warm-up step), in this process."""
    student, teacher, optimizer, batch = setup(args)
    step = step_function(name, student, teacher, batch, args.vocab)
    step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    def measured_step() -> None:
        step()
        optimizer.step()

    return memory_growth_during(measured_step, torch.device(args.device)) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="both models' weights: float32 or bfloat16")
    parser.add_argument("--attn", default="sdpa", help="eager, sdpa or flash_attention_2")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=100, help="question tokens per row")
    parser.add_argument("--answer", type=int, default=30, help="answer tokens per row")
    parser.add_argument("--vocab", type=int, default=None, help="shared vocabulary columns (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    args.vocab = args.vocab or PRESETS[args.preset][0].vocab_size
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.memory_of:
        print(json.dumps({"peak_mb": peak_memory(args.memory_of, args)}))
        return

    configs = args.configs.split(",")
    student, teacher, optimizer, batch = setup(args)
    steps = {name: step_function(name, student, teacher, batch, args.vocab) for name in configs}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for round_index in range(args.repeats + 1):  # the first round warms up
        for name in configs:
            _sync(args.device)
            start = time.perf_counter()
            steps[name]()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(args.device)
            if round_index:
                times[name].append(time.perf_counter() - start)
    del student, teacher, optimizer, steps
    memory = {}
    for name in configs:
        options = {k: v for k, v in vars(args).items() if k not in ("memory_of", "json", "configs", "repeats")}
        passed = [item for key, value in options.items() for item in (f"--{key}", str(value))]
        command = [sys.executable, __file__, "--memory-of", name, *passed]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        memory[name] = json.loads(output.strip().splitlines()[-1])["peak_mb"]

    median = {name: statistics.median(values) for name, values in times.items()}
    student_spec, teacher_spec = PRESETS[args.preset]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    length = batch["input_ids"].shape[1]
    print(
        f"# KD step on {device}, {args.dtype}, {args.attn}, threads {torch.get_num_threads()}: student "
        f"{student_spec.num_layers}x{student_spec.hidden_size}, teacher {teacher_spec.num_layers}x"
        f"{teacher_spec.hidden_size}, vocabulary {student_spec.vocab_size}, {args.rows} rows of {length} tokens "
        f"({student_spec.image_tokens} visual), median of {args.repeats}"
    )
    print(f"{'config':<10} {'ms':>10} {'x SFT':>7} {'x SFT 64':>9} {'peak MB':>9} {'x SFT':>7} {'x SFT 64':>9}")

    def ratio(values: dict[str, float], name: str, base: str) -> float:
        return values[name] / values[base] if values.get(base) else float("nan")

    for name in configs:
        print(
            f"{name:<10} {median[name] * 1e3:>10.1f} {ratio(median, name, 'sft'):>7.3f} "
            f"{ratio(median, name, 'sft_64'):>9.3f} {memory[name]:>9.1f} {ratio(memory, name, 'sft'):>7.3f} "
            f"{ratio(memory, name, 'sft_64'):>9.3f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "median_s": median, "peak_mb": memory, "times": times}, handle, indent=2)


if __name__ == "__main__":
    main()
