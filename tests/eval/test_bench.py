"""`epic bench` on a tiny model: KV bytes measured equal the formula exactly; FLOPs counted match the formula."""

from __future__ import annotations

import json

from PIL import Image

from epic.cli import main
from epic.eval.bench import format_bench, plot_bench, run_bench, synthetic_prompt
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
        assert row.peak_memory is not None and row.peak_memory >= 0  # CPU: resident-set growth
    assert rows[0].flops_ratio == 1.0 and rows[2].flops_ratio < rows[1].flops_ratio < 1.0
    assert "dart" in format_bench(rows)
    plot_bench(rows, tmp_path / "bench.png")
    assert Image.open(tmp_path / "bench.png").size[0] > 300


def test_bench_command(tmp_path, capsys):
    assert main(["bench", "--tokens", "16", "--methods", "random", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [row["method"] for row in rows] == ["none", "random"]
    assert (tmp_path / "bench.png").is_file() and "KV MiB" in capsys.readouterr().out
