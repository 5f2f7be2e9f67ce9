"""`epic bench`: what compression costs and saves, per method and budget, measured against no compression in one run.

Per configuration: prefill latency (a prefill as `generate` runs it: a fresh cache, logits of the last position) and
decoding speed (tokens per second over `new_tokens` greedy steps after the prefill), both as ratios to the
uncompressed run timed alternately with it; the KV cache measured from the real cache tensors next to the formula;
decoder FLOPs by the formula next to `torch.utils.flop_counter` (which sees attention products only under eager
attention); and peak memory (CUDA: peak allocated over the measurements; CPU: the resident-set growth during one
prefill, sampled every millisecond, approximate since the allocator reuses freed memory).
"""

from __future__ import annotations

import resource
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import epic
from epic.compat import Layout
from epic.eval.cost import DecoderShape, kv_cache_bytes, measured_cache_bytes, prefill_macs
from epic.models.assemble import visual_tokens


@dataclass
class BenchRow:
    method: str  # "none" for the uncompressed reference
    tokens: int  # visual tokens kept per image
    prefill_s: float
    prefill_ratio: float
    decode_tokens_per_s: float
    decode_ratio: float
    flops_formula: int  # 2 x MACs of the decoder, SPEC section 4
    flops_ratio: float
    flops_counted: int  # torch.utils.flop_counter over the decoder
    cache_measured: int
    cache_formula: int
    peak_memory: int | None  # bytes: CUDA peak allocated, or on CPU the resident-set growth during a prefill


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_prefill(model, inputs) -> tuple[float, int]:
    """Seconds of one prefill as `generate` runs it (a fresh cache, logits of the last position) and the bytes of
    the cache it filled, read from the cache tensors."""
    device = inputs["input_ids"].device
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - start, measured_cache_bytes(Layout.of(model).output_cache_of(out))


def _decode_rate(model, inputs, new_tokens: int, prefill_seconds: float) -> float:
    """Generated tokens per second (all rows) over the decoding steps, the prefill time taken off."""
    device = inputs["input_ids"].device
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync(device)
    decoding = max(time.perf_counter() - start - prefill_seconds, 1e-9)
    return inputs["input_ids"].shape[0] * (new_tokens - 1) / decoding


def _counted_flops(model, inputs) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(**inputs, logits_to_keep=1)
    counts = counter.get_flop_counts()
    return sum(counts.get(f"{type(model).__name__}.model.language_model", {}).values())


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        return None


def resident_growth_during(work) -> int | None:
    """Resident-set growth during `work()`, sampled every millisecond (approximate: the allocator reuses memory)."""
    before = _resident_bytes()
    if before is None:
        work()
        return None
    peak, running = [before], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        running[0] = False
        sampler.join()
    return max(peak[0], _resident_bytes()) - before


def memory_growth_during(work, device: torch.device) -> int | None:
    """Bytes allocated above the level before `work()` at its peak: CUDA's peak allocation on a GPU, the sampled
    resident-set growth on a CPU (approximate)."""
    if device.type != "cuda":
        return resident_growth_during(work)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    work()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _measure(model, inputs, new_tokens: int, repeats: int) -> tuple[float, float, int, int | None]:
    device = inputs["input_ids"].device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        peak = None
    else:
        peak = resident_growth_during(lambda: timed_prefill(model, inputs))
    prefills, caches = zip(*(timed_prefill(model, inputs) for _ in range(repeats)), strict=True)
    prefill = statistics.median(prefills)
    rate = statistics.median(_decode_rate(model, inputs, new_tokens, prefill) for _ in range(repeats))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    return prefill, rate, caches[0], peak


def synthetic_prompt(model, text_tokens: int = 40, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A POPE-like prompt for `model`: a few text tokens, one image, a short question (random ids, for cost only)."""
    config = model.config
    vision = config.vision_config
    generator = torch.Generator().manual_seed(seed)
    visual = visual_tokens(vision, config.vision_feature_select_strategy)
    vocabulary = config.text_config.vocab_size

    def text(count: int) -> torch.Tensor:
        ids = torch.randint(3, vocabulary, (batch, count), generator=generator)
        return ids.masked_fill(ids == config.image_token_id, 3)  # text never holds the image token

    ids = torch.cat([text(5), torch.full((batch, visual), config.image_token_id), text(max(text_tokens - 5, 1))], 1)
    device = next(model.parameters()).device
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device, next(model.parameters()).dtype),
    }


def run_bench(
    model,
    inputs: dict[str, torch.Tensor],
    methods: list[str],
    budgets: list[int],
    layer: int = 2,
    repeats: int = 3,
    new_tokens: int = 8,
    progress: bool = True,
) -> list[BenchRow]:
    """The uncompressed reference row, then one row per (method, budget)."""
    shape = DecoderShape.from_config(model.config)
    image_token = model.config.image_token_id
    rows, length = inputs["input_ids"].shape
    visual = int((inputs["input_ids"] == image_token).sum()) // max(rows, 1)
    bytes_per_value = next(model.parameters()).element_size()
    timed_prefill(model, inputs)  # warm-up
    base_prefill, base_rate, base_cache, base_peak = _measure(model, inputs, new_tokens, repeats)
    base_flops = 2 * prefill_macs(shape, length) * rows
    result = [
        BenchRow(
            "none",
            visual,
            base_prefill,
            1.0,
            base_rate,
            1.0,
            base_flops,
            1.0,
            _counted_flops(model, inputs),
            base_cache,
            rows * kv_cache_bytes(shape, length, bytes_per_value=bytes_per_value),
            base_peak,
        )
    ]
    for method, tokens in tqdm([(m, t) for m in methods for t in budgets], desc="bench", disable=not progress):
        reference = _measure(model, inputs, new_tokens, repeats)  # timed right before, so drift hits both alike
        with epic.compress(model, method, tokens=tokens, layer=layer):
            prefill, rate, cache, peak = _measure(model, inputs, new_tokens, repeats)
            counted = _counted_flops(model, inputs)
        kept_length = length - visual + tokens
        flops = 2 * prefill_macs(shape, length, kept_length, layer) * rows
        result.append(
            BenchRow(
                method,
                tokens,
                prefill,
                prefill / reference[0],
                rate,
                rate / reference[1],
                flops,
                flops / base_flops,
                counted,
                cache,
                rows * kv_cache_bytes(shape, length, kept_length, layer, bytes_per_value),
                peak,
            )
        )
    return result


def format_bench(rows: list[BenchRow]) -> str:
    """A table: times and FLOPs as ratios to no compression, KV cache measured next to the formula."""
    lines = [
        f"{'method':<8} {'kept':>5} {'prefill ms':>11} {'x none':>7} {'FLOPs x':>8} {'decode tok/s':>13} "
        f"{'x none':>7} {'KV MiB (measured / formula)':>28} {'GFLOPs counted / formula':>25} {'peak MiB':>9}"
    ]
    for row in rows:
        lines.append(
            f"{row.method:<8} {row.tokens:>5} {row.prefill_s * 1e3:>11.1f} {row.prefill_ratio:>7.3f} "
            f"{row.flops_ratio:>8.3f} {row.decode_tokens_per_s:>13.1f} {row.decode_ratio:>7.3f} "
            f"{row.cache_measured / 2**20:>13.2f} / {row.cache_formula / 2**20:<12.2f} "
            f"{row.flops_counted / 1e9:>11.2f} / {row.flops_formula / 1e9:<11.2f} "
            f"{'n/a' if row.peak_memory is None else f'{row.peak_memory / 2**20:.1f}':>9}"
        )
    return "\n".join(lines)


def plot_bench(rows: list[BenchRow], path: Path) -> None:
    """Prefill time ratio against kept tokens per method, with the FLOPs ratio (the ideal) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    full = [(row.tokens, 1.0) for row in rows if row.method == "none"]  # every curve starts at no compression
    methods = sorted({row.method for row in rows if row.method != "none"})
    for method in methods:
        points = sorted(full + [(row.tokens, row.prefill_ratio) for row in rows if row.method == method])
        axis.plot(*zip(*points, strict=True), marker="o", label=f"{method} (measured)")
    ideal = sorted(set(full) | {(row.tokens, row.flops_ratio) for row in rows if row.method != "none"})
    axis.plot(*zip(*ideal, strict=True), linestyle="--", color="gray", label="FLOPs (ideal)")
    axis.axhline(1.0, color="black", linewidth=0.5)
    axis.set_xlabel("visual tokens kept per image")
    axis.set_ylabel("prefill time / uncompressed")
    axis.set_ylim(0, max(1.1, 1.05 * max(row.prefill_ratio for row in rows)))
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
