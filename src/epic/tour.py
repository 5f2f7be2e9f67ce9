"""A short tour of the compression engine: what each method keeps and what it saves, on a tiny LLaVA.

Builds a LLaVA model from a config (random weights, nothing downloaded), compresses it with every registered
method at the paper's budgets mapped onto its image size, and prints the kept patches, the prefill time as a
ratio to the uncompressed prefill measured in the same run, the FLOPs ratio (the ideal) and the KV cache measured
from the real cache tensors next to the formula.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from tqdm import tqdm

import epic
from epic.compression import METHODS
from epic.eval.bench import synthetic_prompt, timed_prefill
from epic.eval.cost import DecoderShape, kv_cache_bytes, prefill_macs
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava

PAPER_BUDGETS = (576, 192, 128, 64, 36)  # LLaVA-1.5 budgets; mapped proportionally onto N visual tokens


@dataclass
class TourRow:
    method: str
    tokens: int
    time_ratio: float
    flops_ratio: float
    cache_measured: int
    cache_formula: int
    kept: list[torch.Tensor]


@dataclass
class Tour:
    spec: TinyLlavaSpec
    layer: int
    batch: int
    prompt_length: int
    full_seconds: float
    full_cache: int
    rows: list[TourRow]


def scaled_budgets(image_tokens: int) -> list[int]:
    """The paper's budgets mapped onto an image of `image_tokens` tokens (576 -> N, 64 -> N/9, ...)."""
    return [max(1, round(image_tokens * budget / 576)) for budget in PAPER_BUDGETS]


def run_tour(spec: TinyLlavaSpec, layer: int = 2, batch: int = 2, repeats: int = 3, seed: int = 0) -> Tour:
    """Measure every method at every scaled budget against the uncompressed prefill."""
    model = build_tiny_llava(spec, seed=seed)
    inputs = synthetic_prompt(model, text_tokens=30, batch=batch, seed=seed)
    shape = DecoderShape.from_config(model.config)
    length = inputs["input_ids"].shape[1]
    bytes_per_value = next(model.parameters()).element_size()
    full_cache = timed_prefill(model, inputs)[1]  # also the warm-up
    rows, full_times = [], []
    budgets = scaled_budgets(spec.image_tokens)
    for method, tokens in tqdm([(m, t) for m in sorted(METHODS) for t in budgets], desc="tour", unit="run"):
        full, compressed = [], []
        for _ in range(repeats):
            full.append(timed_prefill(model, inputs)[0])
            with epic.compress(model, method, tokens=tokens, layer=layer, seed=seed) as state:
                seconds, cache = timed_prefill(model, inputs)
            compressed.append(seconds)
        full_times += full
        kept_length = length - spec.image_tokens + tokens
        rows.append(
            TourRow(
                method=method,
                tokens=tokens,
                time_ratio=statistics.median(compressed) / statistics.median(full),
                flops_ratio=prefill_macs(shape, length, kept_length, layer) / prefill_macs(shape, length),
                cache_measured=cache,
                cache_formula=batch * kv_cache_bytes(shape, length, kept_length, layer, bytes_per_value),
                kept=state.kept,
            )
        )
    return Tour(spec, layer, batch, length, statistics.median(full_times), full_cache, rows)


def patch_grid(kept: torch.Tensor, image_start: int, side: int) -> list[str]:
    """The image's patch grid as text: '#' for a kept patch, '.' for a dropped one."""
    cells = torch.zeros(side * side, dtype=torch.bool)
    cells[kept - image_start] = True
    return ["".join("#" if cell else "." for cell in cells[r * side : (r + 1) * side]) for r in range(side)]


def format_tour(tour: Tour) -> str:
    """The tour as a table plus the kept patch grids of the smallest budget."""
    spec, rows = tour.spec, tour.rows
    lines = [
        f"A tiny LLaVA ({spec.text_model}, {spec.num_layers} layers, hidden {spec.hidden_size}, random weights): "
        f"{spec.image_tokens} visual tokens per image, {tour.prompt_length} tokens per prompt, batch of "
        f"{tour.batch}, compression before layer K={tour.layer}.",
        f"Uncompressed prefill: {tour.full_seconds * 1e3:.1f} ms, KV cache {tour.full_cache / 2**20:.2f} MiB "
        "(measured, fp32).",
        "",
        f"{'method':<8} {'kept':>5} {'prefill time':>13} {'FLOPs':>7} {'KV cache measured':>18} {'formula':>10}",
    ]
    for row in rows:
        lines.append(
            f"{row.method:<8} {row.tokens:>5} {row.time_ratio:>13.3f} {row.flops_ratio:>7.3f} "
            f"{row.cache_measured / 2**20:>14.2f} MiB {row.cache_formula / 2**20:>6.2f} MiB"
        )
    lines.append("(prefill time and FLOPs are ratios to the uncompressed prefill measured in the same run)")
    side = spec.image_size // spec.patch_size
    smallest = min(row.tokens for row in rows)
    shown = [row for row in rows if row.tokens == smallest]
    lines += ["", f"Kept patches of the first image at {smallest} tokens ('#' kept, '.' dropped):"]
    lines.append("   ".join(f"{row.method:<{side}}" for row in shown))
    grids = [patch_grid(row.kept[0], 6, side) for row in shown]
    lines += ["   ".join(parts) for parts in zip(*grids, strict=True)]
    return "\n".join(lines)
