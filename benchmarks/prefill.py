"""Prefill time under visual-token compression, next to the FLOPs ideal, measured in one run.

For every method and budget the compressed prefill and the uncompressed prefill are timed alternately (so drift
of the machine hits both alike); the reported time ratio is median(compressed) / median(uncompressed). The FLOPs
ratio is the decoder's, by the formula of SPEC section 4; "efficiency" is the measured speedup as a share of the
ideal one (FLOPs ratio / time ratio; 1.0 means every saved FLOP became saved time); "scoring" is the time spent
scoring and selecting as a share of prefill.

    OMP_NUM_THREADS=1 python benchmarks/prefill.py                 # CPU, tiny-but-wide model, 576 visual tokens
    python benchmarks/prefill.py --preset llava-7b --device cuda --dtype bfloat16 --attn sdpa
    OMP_NUM_THREADS=1 python benchmarks/prefill.py --family qwen2_5_vl --grid 72x72 --budgets 1296,144   # M-RoPE

By default every registered method runs at --layer and, where it needs no layer K-1 scores, before the LLM too
(`name@0`); the speed-ups are printed both ways, ideal (1 / FLOPs ratio) and measured (1 / time ratio).
Targets at 64 tokens: efficiency >= 0.8 and scoring < 3% of prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace

import torch

import epic
from epic.compression.registry import method_spec, method_stages
from epic.eval.bench import synthetic_prompt, timed_prefill
from epic.eval.cost import DecoderShape, prefill_macs
from epic.models.presets import PRESETS
from epic.models.tiny import QWEN_VL_FAMILIES, build_tiny_llava, build_tiny_qwen_vl


def measure(model, inputs, method: str, tokens: int, layer: int, repeats: int) -> dict[str, float]:
    """Median full and compressed prefill seconds, the scoring share, and the stages the method pruned at."""
    full, compressed, scoring = [], [], 0.0
    for _ in range(repeats):
        full.append(timed_prefill(model, inputs)[0])
        with epic.compress(model, method, tokens=tokens, layer=layer, profile=True) as state:
            compressed.append(timed_prefill(model, inputs)[0])
        scoring += state.scoring_seconds
    return {
        "stages": state.stages,
        "full_s": statistics.median(full),
        "compressed_s": statistics.median(compressed),
        "scoring_share": scoring / sum(compressed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(set(PRESETS) - {"tiny"}), default="cpu-wide")
    parser.add_argument("--family", choices=["llava", *QWEN_VL_FAMILIES], default="llava")
    parser.add_argument("--grid", default="72x72", help="Qwen-VL: the image's patch grid (72x72: 1296 tokens)")
    parser.add_argument("--layers", type=int, help="override the number of decoder layers")
    parser.add_argument("--methods", help="comma-separated, name@K at layer K (default: every method and stage)")
    parser.add_argument("--budgets", default="576,192,128,64,36")
    parser.add_argument("--layer", type=int, default=2, help="K: first decoder layer that sees the kept tokens")
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", help="eager, sdpa or flash_attention_2")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    spec = PRESETS[args.preset]
    if args.layers:
        spec = replace(spec, num_layers=args.layers)
    dtype, grid = getattr(torch, args.dtype), tuple(int(side) for side in args.grid.split("x"))
    if args.family == "llava":
        model = build_tiny_llava(spec, attn_implementation=args.attn, dtype=dtype).to(args.device)
    else:  # the preset's decoder, a tiny tower of 2 x 2-pixel patches (its cost is not the decoder's)
        spec = replace(spec, patch_size=2)
        model = build_tiny_qwen_vl(args.family, spec, attn_implementation=args.attn, dtype=dtype).to(args.device)
    inputs = synthetic_prompt(model, args.text_tokens, args.batch, grid=grid)
    image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    shape = DecoderShape.from_config(model.config)
    length = inputs["input_ids"].shape[1]
    for _ in range(2):  # warm-up (allocator, kernels)
        timed_prefill(model, inputs)[0]

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"# prefill: {args.family}, preset {args.preset}, {spec.num_layers} layers, hidden {spec.hidden_size}, "
        f"{image} visual + {args.text_tokens} text tokens, batch {args.batch}, K={args.layer}, "
        f"{args.dtype}, {args.attn}, {device_name}, torch threads {torch.get_num_threads()}"
    )
    methods = args.methods.split(",") if args.methods else method_stages(args.layer)
    if args.family != "llava" and not args.methods:  # before the LLM is not supported on Qwen-VL yet
        methods = [method for method in methods if method_spec(method, args.layer)[1] > 0]
    width = max(8, *(len(method) for method in methods))
    print(
        f"{'method':<{width}} {'K':>2} {'kept':>5} {'FLOPs':>7} {'time':>7} {'ideal x':>8} {'measured x':>10} "
        f"{'efficiency':>10} {'scoring':>8} {'full ms':>9}"
    )
    results = []
    for method in methods:
        name, layer = method_spec(method, args.layer)
        for tokens in (int(b) for b in args.budgets.split(",")):
            timing = measure(model, inputs, name, tokens, layer, args.repeats)
            kept = [(stage.layer, length - image + stage.budget.resolve(image)) for stage in timing.pop("stages")]
            flops_ratio = prefill_macs(shape, length, stages=kept) / prefill_macs(shape, length)
            time_ratio = timing["compressed_s"] / timing["full_s"]
            efficiency = flops_ratio / time_ratio  # measured speedup / ideal speedup
            row = {
                "method": name,
                "layer": layer,
                "tokens": tokens,
                "flops_ratio": flops_ratio,
                "time_ratio": time_ratio,
                "efficiency": efficiency,
                "stages": kept,  # (layer, sequence length from there on)
                **timing,
            }
            results.append(row)
            print(
                f"{method:<{width}} {layer:>2} {tokens:>5} {flops_ratio:>7.3f} {time_ratio:>7.3f} "
                f"{1 / flops_ratio:>8.2f} {1 / time_ratio:>10.2f} {efficiency:>10.2f} "
                f"{timing['scoring_share']:>7.2%} {timing['full_s'] * 1e3:>9.1f}",
                flush=True,
            )
    print(
        "# efficiency = measured speedup / FLOPs-ideal speedup = FLOPs ratio / time ratio; target >= 0.8 at 64; "
        "the FLOPs are the decoder's (the vision tower and projector run in full either way)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "device": device_name, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
