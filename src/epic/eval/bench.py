"""`epic bench`: what compression costs and saves, per method and budget, measured against no compression in one run.

Per configuration: prefill latency (a prefill as `generate` runs it: a fresh cache, logits of the last position) and
decoding speed (tokens per second over `new_tokens` greedy steps after the prefill), both as ratios to the printed
uncompressed row, which is timed again before every configuration; timings too short or too spread are repeated and
then flagged; the KV cache measured from the real cache tensors next to the formula; decoder FLOPs by the formula
next to `torch.utils.flop_counter` (which sees attention products only under eager attention); and on CUDA the peak
allocation (`epic.eval.memory`).
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import epic
from epic.compat import Layout
from epic.compression.families import GRID_RESOLUTION
from epic.compression.registry import method_spec
from epic.eval.cost import DecoderShape, kv_cache_bytes, measured_cache_bytes, prefill_macs
from epic.models.assemble import visual_tokens

NOISY_SPREAD = 0.05  # a timing whose median absolute deviation exceeds 5% of its median is flagged
NOISY_BELOW_S = 1e-3  # and so is any prefill under a millisecond: timer and scheduler noise dominate


@dataclass
class Timing:
    """The median of repeated measurements and their spread (median absolute deviation / median)."""

    median: float
    spread: float

    @classmethod
    def of(cls, values: list[float]) -> Timing:
        middle = statistics.median(values)
        deviation = statistics.median(abs(value - middle) for value in values)
        return cls(middle, deviation / middle if middle else 0.0)

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD


@dataclass
class BenchRow:
    method: str  # "none" for the uncompressed reference
    tokens: int  # visual tokens kept per image
    prefill_s: float
    prefill_spread: float  # median absolute deviation / median over the repeats
    prefill_ratio: float  # prefill_s / the none row's prefill_s
    decode_tokens_per_s: float
    decode_spread: float
    decode_ratio: float  # decode_tokens_per_s / the none row's
    flops_formula: int  # 2 x MACs of the decoder, SPEC section 4
    flops_ratio: float
    flops_counted: int  # torch.utils.flop_counter over the decoder
    cache_measured: int
    cache_formula: int
    peak_memory: int | None  # bytes, CUDA's peak allocation; None on a CPU, where nothing reliable is measured

    @property
    def prefill_noisy(self) -> bool:
        return self.prefill_spread > NOISY_SPREAD or self.prefill_s < NOISY_BELOW_S

    @property
    def decode_noisy(self) -> bool:
        return self.decode_spread > NOISY_SPREAD


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


def _measure(model, inputs, new_tokens: int, repeats: int) -> tuple[list[float], list[float], int, int | None]:
    """Prefill seconds and decoding rates, `repeats` of each, the cache bytes and CUDA's peak allocation."""
    device = inputs["input_ids"].device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefills, caches = zip(*(timed_prefill(model, inputs) for _ in range(repeats)), strict=True)
    prefill = statistics.median(prefills)
    rates = [_decode_rate(model, inputs, new_tokens, prefill) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return list(prefills), rates, caches[0], peak


def _measure_until_stable(
    model, inputs, new_tokens: int, repeats: int
) -> tuple[list[float], list[float], int, int | None]:
    """`_measure`, repeated (up to three times as many samples) while the timings spread more than NOISY_SPREAD."""
    prefills, rates, cache, peak = _measure(model, inputs, new_tokens, repeats)
    while (Timing.of(prefills).noisy or Timing.of(rates).noisy) and len(prefills) < 3 * repeats:
        more_prefills, more_rates, _, more_peak = _measure(model, inputs, new_tokens, repeats)
        prefills, rates = prefills + more_prefills, rates + more_rates
        peak = None if peak is None else max(peak, more_peak)
    return prefills, rates, cache, peak


def synthetic_prompt(
    model, text_tokens: int = 40, batch: int = 1, seed: int = 0, grid: tuple[int, int] = (72, 72)
) -> dict[str, torch.Tensor]:
    """A POPE-like prompt for `model`: a few text tokens, one image, a short question (random ids, for cost only).
    On Qwen2-VL / Qwen2.5-VL the image is one frame of `grid` (h, w) patches between the vision markers (72 x 72:
    1,296 tokens, Qwen2.5-VL's count for a 1008 x 1008 image)."""
    config = model.config
    vision = config.vision_config
    generator = torch.Generator().manual_seed(seed)
    vocabulary = config.text_config.vocab_size
    grid_family = config.model_type in GRID_RESOLUTION
    specials = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    reserved = min(getattr(config, name) for name in specials if getattr(config, name, None) is not None)

    def text(count: int) -> torch.Tensor:
        ids = torch.randint(3, vocabulary, (batch, count), generator=generator)
        return ids.masked_fill(ids >= reserved, 3)  # text never holds an image or vision-marker token

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    if grid_family:
        marker = lambda token: torch.full((batch, 1), token)  # noqa: E731
        tokens = grid[0] * grid[1] // vision.spatial_merge_size**2
        image = torch.cat([marker(config.vision_start_token_id), torch.full((batch, tokens), config.image_token_id)], 1)
        ids = torch.cat([text(5), image, marker(config.vision_end_token_id), text(max(text_tokens - 7, 1))], 1)
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.randn(batch * grid[0] * grid[1], patch, generator=generator)
        extra = {"image_grid_thw": torch.tensor([[1, *grid]] * batch)}
        extra["mm_token_type_ids"] = (ids == config.image_token_id).long()
    else:
        visual = visual_tokens(vision, config.vision_feature_select_strategy)
        ids = torch.cat([text(5), torch.full((batch, visual), config.image_token_id), text(max(text_tokens - 5, 1))], 1)
        pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
        extra = {}
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device, dtype),
        **{key: value.to(device) for key, value in extra.items()},
    }


def check_bench_options(new_tokens: int, repeats: int) -> None:
    """Refuse settings that measure nothing: decoding speed is taken over the steps after the first new token."""
    if new_tokens < 2:
        raise ValueError(f"--new-tokens {new_tokens}: decoding speed needs at least 2 new tokens (e.g. 8)")
    if repeats < 1:
        raise ValueError(f"--repeats {repeats}: time each configuration at least once (e.g. 3)")


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
    """The uncompressed reference row, then one row per (method, budget), every ratio taken to the reference row.
    A method compresses at `layer`, or at K when written `name@K` (`divprune@0`: before the LLM).

    The reference is timed again right before each configuration, so drift over the run hits both alike; its row
    is the median over all of those samples, and it is the number the ratios divide by.
    """
    check_bench_options(new_tokens, repeats)
    shape = DecoderShape.from_config(model.config)
    rows, length = inputs["input_ids"].shape
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum()) // max(rows, 1)
    bytes_per_value = next(model.parameters()).element_size()
    timed_prefill(model, inputs)  # warm-up
    base_prefills, base_rates, base_cache, base_peak = _measure_until_stable(model, inputs, new_tokens, repeats)
    measured = []
    for method, tokens in tqdm([(m, t) for m in methods for t in budgets], desc="bench", disable=not progress):
        reference_prefills, reference_rates, _, _ = _measure(model, inputs, new_tokens, repeats)
        base_prefills, base_rates = base_prefills + reference_prefills, base_rates + reference_rates
        name, method_layer = method_spec(method, layer)
        with epic.compress(model, name, tokens=tokens, layer=method_layer) as state:
            prefills, rates, cache, peak = _measure_until_stable(model, inputs, new_tokens, repeats)
            counted = _counted_flops(model, inputs)
        stages = [(stage.layer, length - visual + stage.budget.resolve(visual)) for stage in state.stages]
        measured.append((method, stages, tokens, Timing.of(prefills), Timing.of(rates), cache, peak, counted))
    prefill, rate = Timing.of(base_prefills), Timing.of(base_rates)
    base_flops = 2 * prefill_macs(shape, length) * rows
    result = [
        BenchRow(
            method="none",
            tokens=visual,
            prefill_s=prefill.median,
            prefill_spread=prefill.spread,
            prefill_ratio=1.0,
            decode_tokens_per_s=rate.median,
            decode_spread=rate.spread,
            decode_ratio=1.0,
            flops_formula=base_flops,
            flops_ratio=1.0,
            flops_counted=_counted_flops(model, inputs),
            cache_measured=base_cache,
            cache_formula=rows * kv_cache_bytes(shape, length, bytes_per_value=bytes_per_value),
            peak_memory=base_peak,
        )
    ]
    for method, stages, tokens, prefills, rates, cache, peak, counted in measured:
        flops = 2 * prefill_macs(shape, length, stages=stages) * rows
        result.append(
            BenchRow(
                method=method,
                tokens=tokens,
                prefill_s=prefills.median,
                prefill_spread=prefills.spread,
                prefill_ratio=prefills.median / prefill.median,
                decode_tokens_per_s=rates.median,
                decode_spread=rates.spread,
                decode_ratio=rates.median / rate.median,
                flops_formula=flops,
                flops_ratio=flops / base_flops,
                flops_counted=counted,
                cache_measured=cache,
                cache_formula=rows * kv_cache_bytes(shape, length, bytes_per_value=bytes_per_value, stages=stages),
                peak_memory=peak,
            )
        )
    return result


def _flagged(value: str, noisy: bool) -> str:
    return f"~{value}" if noisy else value


def format_bench(rows: list[BenchRow]) -> str:
    """A table: times and FLOPs as ratios to the none row above them, KV cache measured next to the formula;
    timings too short or too spread to trust marked `~`, the peak-memory column only where it was measured."""
    with_peak = any(row.peak_memory is not None for row in rows)
    width = max(8, *(len(row.method) for row in rows))
    header = (
        f"{'method':<{width}} {'kept':>5} {'prefill ms':>11} {'x none':>7} {'FLOPs x':>8} {'decode tok/s':>13} "
        f"{'x none':>7} {'KV MiB (measured / formula)':>28} {'GFLOPs counted / formula':>25}"
    )
    lines = [header + (f" {'peak MiB':>9}" if with_peak else "")]
    for row in rows:
        prefill_noisy = row.prefill_noisy or rows[0].prefill_noisy
        decode_noisy = row.decode_noisy or rows[0].decode_noisy
        line = (
            f"{row.method:<{width}} {row.tokens:>5} {_flagged(f'{row.prefill_s * 1e3:.2f}', row.prefill_noisy):>11} "
            f"{_flagged(f'{row.prefill_ratio:.3f}', prefill_noisy):>7} {row.flops_ratio:>8.3f} "
            f"{_flagged(f'{row.decode_tokens_per_s:.1f}', row.decode_noisy):>13} "
            f"{_flagged(f'{row.decode_ratio:.3f}', decode_noisy):>7} "
            f"{row.cache_measured / 2**20:>13.2f} / {row.cache_formula / 2**20:<12.2f} "
            f"{row.flops_counted / 1e9:>11.2f} / {row.flops_formula / 1e9:<11.2f}"
        )
        lines.append(line + (f" {row.peak_memory / 2**20:>9.1f}" if with_peak else ""))
    if any(row.prefill_noisy or row.decode_noisy for row in rows):
        lines.append(
            f"~ noise: under {NOISY_BELOW_S * 1e3:.0f} ms, or spread over {NOISY_SPREAD:.0%} of the median after "
            "repeating; raise --repeats or use a larger --preset before reading those ratios"
        )
    if not with_peak:
        lines.append("peak memory: measured on CUDA only")
    return "\n".join(lines)


def bench_settings(llava, inputs: dict[str, torch.Tensor], **settings) -> dict:
    """What a bench ran under, for bench.json: the given settings plus the prompt's shape, device and versions."""
    import transformers

    device = inputs["input_ids"].device
    image_token = llava.config.image_token_id
    return {
        **settings,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(llava.parameters()).dtype).removeprefix("torch."),
        "attn": llava.config._attn_implementation,
        "threads": torch.get_num_threads(),
        "batch": inputs["input_ids"].shape[0],
        "prompt_tokens": inputs["input_ids"].shape[1],
        "visual_tokens": int((inputs["input_ids"][0] == image_token).sum()),
        "versions": {"epic": epic.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }


def plot_bench(rows: list[BenchRow], path: Path, title: str = "") -> Figure:
    """Prefill time ratio against kept tokens per method, with the FLOPs ratio (the ideal) dashed; x ticks at the
    measured budgets."""
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    full = [(row.tokens, 1.0) for row in rows if row.method == "none"]  # every curve starts at no compression
    methods = sorted({row.method for row in rows if row.method != "none"})
    for method, marker in zip(methods, itertools.cycle("os^Dv"), strict=False):
        points = sorted(full + [(row.tokens, row.prefill_ratio) for row in rows if row.method == method])
        axis.plot(*zip(*points, strict=True), marker=marker, label=f"{method} (measured)")
    ideal = sorted(set(full) | {(row.tokens, row.flops_ratio) for row in rows if row.method != "none"})
    axis.plot(*zip(*ideal, strict=True), linestyle="--", color="gray", label="FLOPs (ideal)")
    axis.axhline(1.0, color="black", linewidth=0.5)
    axis.set_xticks(sorted({row.tokens for row in rows}))
    axis.set_xlabel("visual tokens kept per image")
    axis.set_ylabel("prefill time / uncompressed")
    if title:
        axis.set_title(title, fontsize=9)
    axis.set_ylim(0, max(1.1, 1.05 * max(row.prefill_ratio for row in rows)))
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return figure
