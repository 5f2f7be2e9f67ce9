"""The `epic` command line and the tour behind `epic demo`."""

from __future__ import annotations

import pytest

from epic.cli import main
from epic.models.tiny import TinyLlavaSpec
from epic.tour import format_tour, run_tour, scaled_budgets


def test_paper_budgets_scale_to_the_image():
    assert scaled_budgets(576) == [576, 192, 128, 64, 36]
    assert scaled_budgets(144) == [144, 48, 32, 16, 9]


def test_tour_measures_every_method_and_budget():
    spec = TinyLlavaSpec()
    tour = run_tour(spec, repeats=1)
    assert {row.method for row in tour.rows} == {"dart", "fastv", "random"}
    for row in tour.rows:
        assert row.cache_measured == row.cache_formula
        assert all(kept.numel() == row.tokens for kept in row.kept)
        assert row.time_ratio > 0
    full = [row for row in tour.rows if row.tokens == spec.image_tokens]
    assert all(row.flops_ratio == 1.0 and row.cache_measured == tour.full_cache for row in full)
    text = format_tour(tour)
    assert "Kept patches" in text and text.count("#") >= 3 * 4


def test_demo_command_prints_the_tour(capsys):
    assert main(["demo", "--repeats", "1", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "Uncompressed prefill" in out and "dart" in out and "fastv" in out and "random" in out


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["frobnicate"])
