"""Batched generation under compression against the stock model, and a batch of 8 rows against the same 8 rows
one at a time (all the released code of every method can do), measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/generate.py                     # LLaVA, preset demo: 196 tokens per image
    OMP_NUM_THREADS=1 python benchmarks/generate.py --family qwen2_5_vl --grid 72x72 --tokens 1296,144
    python benchmarks/generate.py --preset llava-7b --device cuda --dtype bfloat16    # LLaVA-1.5-7B shapes

Rows differ in prompt length (left padding, as `generate` is used). For every budget: time to first token of the
batch (a prefill and one new token), decoding speed in tokens per second over all rows (the steps after the first),
peak memory (on CUDA), then the batch against its rows one at a time at the same budget. Compressed and stock runs
alternate, so drift of the machine hits both alike; each figure is the median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from dataclasses import replace

import torch

import epic
from epic.models.presets import PRESETS
from epic.models.tiny import build_tiny_llava, build_tiny_qwen_vl


def text(count: int, vocabulary: int, reserved: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.randint(3, vocabulary, (count,), generator=generator)
    return ids.masked_fill(ids >= reserved, 3)  # never an image or vision-marker token


def llava_rows(model, rows: int, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """One prompt per row (5 text tokens, the image, 20-48 question tokens): ids and pixels."""
    config, vision = model.config, model.config.vision_config
    vocabulary, visual = config.text_config.vocab_size, (vision.image_size // vision.patch_size) ** 2
    prompts = []
    for row in range(rows):
        image = torch.full((visual,), config.image_token_id)
        ids = torch.cat([text(5, vocabulary, config.image_token_id, generator), image])
        ids = torch.cat([ids, text(20 + 4 * row, vocabulary, config.image_token_id, generator)])
        pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=generator)
        prompts.append({"input_ids": ids, "pixel_values": pixels})
    return prompts


def qwen_rows(model, rows: int, grid: tuple[int, int], generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """One prompt per row with one image of `grid` (h, w) patches between the vision markers."""
    config, vision = model.config, model.config.vision_config
    reserved = config.vision_end_token_id
    tokens = grid[0] * grid[1] // vision.spatial_merge_size**2
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    prompts = []
    for row in range(rows):
        image = [torch.tensor([config.vision_start_token_id]), torch.full((tokens,), config.image_token_id)]
        question = text(20 + 4 * row, config.text_config.vocab_size, reserved, generator)
        parts = [text(5, config.text_config.vocab_size, reserved, generator), *image]
        ids = torch.cat([*parts, torch.tensor([config.vision_end_token_id]), question])
        pixels = torch.randn(grid[0] * grid[1], patch, generator=generator)
        prompts.append({"input_ids": ids, "pixel_values": pixels, "image_grid_thw": torch.tensor([[1, *grid]])})
    return prompts


def batched(model, prompts: list[dict[str, torch.Tensor]], device: str) -> dict[str, torch.Tensor]:
    """The prompts left-padded into one batch (pixels concatenated in row order)."""
    length = max(prompt["input_ids"].numel() for prompt in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - prompt["input_ids"].numel() :] = prompt["input_ids"]
        mask[row, length - prompt["input_ids"].numel() :] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    for key in ("pixel_values", "image_grid_thw"):
        if key in prompts[0]:
            batch[key] = torch.cat([prompt[key] for prompt in prompts])
    if "image_grid_thw" in batch:
        batch["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
    dtype = next(model.parameters()).dtype
    return {key: value.to(device, dtype) if key == "pixel_values" else value.to(device) for key, value in batch.items()}


def timed_generate(model, batch: dict[str, torch.Tensor], new_tokens: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model, prompts, device, method, tokens, layer, new_tokens, repeats) -> dict[str, float]:
    """Medians of: the batch's first token, the batch with `new_tokens`, its rows one at a time; peak memory."""
    batch = batched(model, prompts, device)
    singles = [batched(model, [prompt], device) for prompt in prompts]
    first, whole, one_by_one, peak = [], [], [], 0
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad(), epic.compress(model, method, tokens=tokens, layer=layer) if tokens else nullcontext():
            first.append(timed_generate(model, batch, 1))
            whole.append(timed_generate(model, batch, new_tokens))
            one_by_one.append(sum(timed_generate(model, single, new_tokens) for single in singles))
        if torch.cuda.is_available():
            peak = max(peak, torch.cuda.max_memory_allocated())
    first_s, whole_s = statistics.median(first), statistics.median(whole)
    return {
        "ttft_s": first_s,
        "decode_tokens_per_s": len(prompts) * (new_tokens - 1) / max(whole_s - first_s, 1e-9),
        "batch_s": whole_s,
        "one_by_one_s": statistics.median(one_by_one),
        "peak_bytes": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["llava", "qwen2_vl", "qwen2_5_vl"], default="llava")
    parser.add_argument("--preset", choices=sorted(set(PRESETS) - {"tiny"}), default="demo")
    parser.add_argument("--grid", default="72x72", help="Qwen-VL: the image's patch grid (72x72: 1296 tokens)")
    parser.add_argument("--method", default="dart")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--tokens", help="budgets, comma-separated (the full count: stock; default N, N/3, N/9)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    spec, dtype = PRESETS[args.preset], getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    if args.family == "llava":
        model = build_tiny_llava(spec, attn_implementation=args.attn, dtype=dtype)
        prompts, full = llava_rows(model, args.rows, generator), spec.image_tokens
    else:
        grid = tuple(int(side) for side in args.grid.split("x"))
        spec = replace(spec, patch_size=2, vision_hidden_size=32)
        model = build_tiny_qwen_vl(args.family, spec, attn_implementation=args.attn, dtype=dtype)
        prompts, full = qwen_rows(model, args.rows, grid, generator), grid[0] * grid[1] // 4
    model.to(args.device)
    budgets = [int(tokens) for tokens in (args.tokens or f"{full},{full // 3},{full // 9}").split(",")]
    timed_generate(model, batched(model, prompts[:2], args.device), 2)  # warm-up
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"# generate: {args.family}, preset {args.preset} ({spec.num_layers} layers, hidden {spec.hidden_size}), "
        f"{full} visual tokens per image, {args.rows} rows (left-padded), {args.new_tokens} new tokens, "
        f"{args.method} at K={args.layer}, {args.dtype}, {args.attn}, {device_name}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"{'kept':>5} {'TTFT ms':>9} {'TTFT x':>7} {'tok/s':>8} {'tok/s x':>8} {'peak MB':>8} {'batch s':>8} "
        f"{'1-by-1 s':>9} {'batch x':>8}"
    )
    results = []
    for tokens in budgets:
        row = measure(
            model,
            prompts,
            args.device,
            args.method,
            None if tokens == full else tokens,
            args.layer,
            args.new_tokens,
            args.repeats,
        )
        row["tokens"] = tokens
        results.append(row)
        stock = results[0]
        print(
            f"{tokens:>5} {row['ttft_s'] * 1e3:>9.1f} {stock['ttft_s'] / row['ttft_s']:>7.2f} "
            f"{row['decode_tokens_per_s']:>8.1f} {row['decode_tokens_per_s'] / stock['decode_tokens_per_s']:>8.2f} "
            f"{row['peak_bytes'] / 2**20:>8.0f} {row['batch_s']:>8.2f} {row['one_by_one_s']:>9.2f} "
            f"{row['one_by_one_s'] / row['batch_s']:>8.2f}",
            flush=True,
        )
    print(
        "# x: against the first budget (stock when it is the full count); batch x = one-by-one time / batch time; "
        "peak memory is measured on CUDA only (0 on the CPU)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
