"""The grid's plot reads right: ticks at the budgets, a 0-100 axis with the chance level, every method visible."""

from __future__ import annotations

import pytest

from epic.eval.grid import GridRow, plot_grid
from epic.eval.runner import EvalItem
from epic.eval.tasks import chance_level


def _rows() -> list[GridRow]:
    rows = [GridRow("none", 64, {"overall": 40.0})]
    for method in ("dart", "fastv", "random"):
        rows += [GridRow(method, tokens, {"overall": 35.0}) for tokens in (21, 14, 7, 4)]  # all equal: overlapping
    return rows


def test_grid_plot_has_budget_ticks_a_fixed_axis_the_chance_level_and_distinguishable_lines(tmp_path):
    figure = plot_grid(_rows(), tmp_path / "grid.png", title="demo/models/tcd: shapes, 1500 items, cpu", chance=31.9)
    assert (tmp_path / "grid.png").stat().st_size > 10_000
    (axis,) = figure.axes
    assert list(axis.get_xticks()) == [4, 7, 14, 21, 64]
    assert [label.get_text() for label in axis.get_xticklabels()] == ["4", "7", "14", "21", "64"]
    assert axis.get_ylim() == (0, 100)
    chance = [line for line in axis.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [31.9, 31.9]
    methods = [line for line in axis.get_lines() if line.get_label() in ("dart", "fastv", "random")]
    assert len({line.get_marker() for line in methods}) == 3  # one marker each
    assert len({tuple(line.get_xdata()) for line in methods}) == 3  # offset: equal values do not hide each other
    assert axis.get_title() == "demo/models/tcd: shapes, 1500 items, cpu"
    assert axis.get_legend() is not None and not figure.legends  # one legend


def test_chance_level_is_the_mix_of_the_items_question_types():
    def items(*types):
        return [EvalItem(str(i), [], [], "a", {"type": kind}) for i, kind in enumerate(types)]

    assert chance_level("shapes", items("colour", "exists")) == pytest.approx(100 * (1 / 6 + 1 / 2) / 2)
    assert chance_level("shapes", items("colour", "mystery")) is None  # an unknown type: no chance level claimed
    assert chance_level("gqa", items("colour")) is None
