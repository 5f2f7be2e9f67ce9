"""`epic bench` on a tiny model: KV bytes measured equal the formula exactly; FLOPs counted match the formula; the
table's ratios are the printed timings divided by the printed reference; noise is flagged; bench.json says how."""

from __future__ import annotations

import json

from PIL import Image

from epic.cli import main
from epic.eval.bench import BenchRow, Timing, format_bench, plot_bench, run_bench, synthetic_prompt
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava


def test_bench_rows_cache_and_flops(tmp_path):
    model = build_tiny_llava(TinyLlavaSpec(), attn_implementation="eager")
    inputs = synthetic_prompt(model, text_tokens=20, batch=2)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * 64
    rows = run_bench(model, inputs, ["dart", "fastv"], [16, 7], repeats=1, new_tokens=3, progress=False)
    assert [(row.method, row.tokens) for row in rows] == [
        ("none", 64),
        ("dart", 16),
        ("dart", 7),
        ("fastv", 16),
        ("fastv", 7),
    ]
    for row in rows:
        assert row.cache_measured == row.cache_formula
        # eager attention: the counter sees every product; the remainder is scoring (one attention row, pivots)
        assert row.flops_formula <= row.flops_counted <= row.flops_formula * 1.01
        assert row.prefill_s > 0 and row.decode_tokens_per_s > 0
        assert row.peak_memory is None  # CPU: nothing reliable to measure, so no column
        assert row.prefill_ratio == row.prefill_s / rows[0].prefill_s
        assert row.decode_ratio == row.decode_tokens_per_s / rows[0].decode_tokens_per_s
    assert rows[0].flops_ratio == 1.0 and rows[2].flops_ratio < rows[1].flops_ratio < 1.0
    table = format_bench(rows)
    assert "dart" in table and "peak MiB" not in table and "measured on CUDA only" in table
    plot_bench(rows, tmp_path / "bench.png", title="tiny")
    assert Image.open(tmp_path / "bench.png").size[0] > 300


def test_bench_of_a_method_before_the_llm_counts_every_layer_compressed():
    model = build_tiny_llava(TinyLlavaSpec(), attn_implementation="eager")
    inputs = synthetic_prompt(model, text_tokens=20, batch=1)
    rows = run_bench(model, inputs, ["divprune@0", "divprune"], [7], repeats=1, new_tokens=3, progress=False)
    none, before, inside = rows
    assert (before.method, inside.method) == ("divprune@0", "divprune")
    length, kept = 20 + 64, 20 + 7  # text and one image; the image compressed to 7
    assert before.flops_ratio < inside.flops_ratio < 1.0
    assert before.cache_measured == before.cache_formula < inside.cache_measured == inside.cache_formula
    # counted beyond the decoder's formula: DivPrune's 64 x 64 cosine matrix over 64-wide features, nothing else
    assert before.flops_counted - before.flops_formula == 2 * 64 * 64 * 64
    assert before.cache_formula == 4 * kept * 2 * 2 * 16 * 4  # every layer holds the kept sequence (fp32)
    assert none.cache_formula == 4 * length * 2 * 2 * 16 * 4


def _row(method: str, prefill_s: float, spread: float = 0.0) -> BenchRow:
    return BenchRow(method, 7, prefill_s, spread, prefill_s / 0.2, 100.0, 0.0, 1.0, 10, 1.0, 10, 1, 1, None)


def test_short_or_spread_timings_are_flagged_as_noise_and_steady_ones_are_not():
    steady = format_bench([_row("none", 0.2), _row("dart", 0.1)])
    assert "~" not in steady and "noise" not in steady
    assert "0.500" in steady.splitlines()[2]  # 100.00 ms / 200.00 ms, as printed
    short = format_bench([_row("none", 0.2), _row("dart", 0.0004)]).splitlines()
    assert "~0.40" in short[2] and "~0.002" in short[2] and short[-2].startswith("~ noise")
    spread = format_bench([_row("none", 0.2, spread=0.2), _row("dart", 0.1)]).splitlines()
    assert "~200.00" in spread[1] and "~0.500" in spread[2]  # a noisy reference makes every ratio noisy


def test_timing_spread_is_the_median_absolute_deviation_over_the_median():
    timing = Timing.of([1.0, 1.1, 0.9, 3.0])
    assert timing.median == 1.05 and abs(timing.spread - 0.1 / 1.05) < 1e-12 and timing.noisy
    assert not Timing.of([1.0, 1.01, 0.99]).noisy


def test_bench_command_says_what_it_runs_and_records_it(tmp_path, capsys):
    command = ["bench", "--preset", "tiny", "--tokens", "16", "--methods", "random", "--repeats", "1"]
    assert main([*command, "--threads", "1", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench.json").read_text())
    assert [row["method"] for row in record["rows"]] == ["none", "random"]
    settings = record["settings"]
    assert settings["model"] == "preset tiny (random weights)" and settings["device"] == "cpu"
    assert (settings["dtype"], settings["threads"], settings["repeats"], settings["layer"]) == ("float32", 1, 1, 2)
    assert settings["visual_tokens"] == 64 and set(settings["versions"]) == {"epic", "torch", "transformers"}
    out = capsys.readouterr().out
    header, table = out.index("epic bench: preset tiny"), out.index("KV MiB")
    assert header < table and "64 visual" in out and "random at 16 from layer 2" in out
    assert (tmp_path / "bench.png").is_file()


def test_a_qwen_vl_prompt_holds_one_grid_image_per_row_and_prefills_compressed():
    import epic
    from epic.eval.bench import timed_prefill
    from epic.models.tiny import build_tiny_qwen_vl

    model = build_tiny_qwen_vl("qwen2_5_vl")
    inputs = synthetic_prompt(model, text_tokens=12, batch=2, grid=(8, 12))
    assert ((inputs["input_ids"] == model.config.image_token_id).sum(dim=1) == 24).all()  # 8 x 12 patches / 4
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 12]] * 2
    with epic.compress(model, "fastv", ratio=0.75) as state:
        timed_prefill(model, inputs)
    assert state.image_sizes == [[24], [24]] and [kept.numel() for kept in state.kept] == [6, 6]
