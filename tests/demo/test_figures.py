"""The demo's plots read right: ticks at the demo's budgets, a 0-100 axis with the scored question's chance level,
one legend, and a title that says what was measured (and when it was only --quick)."""

from __future__ import annotations

import pytest

from epic.demo import demo_config
from epic.demo.config import arm_runs
from epic.demo.figures import plot_accuracy, plot_headline
from epic.demo.report import LABELS, SHORT
from tests.demo.test_report import write_grid


@pytest.fixture
def grids(tmp_path):
    config = demo_config(quick=True)
    full, budgets = config.image_tokens, config.budgets
    for name, _, _ in [("stage1", "stage1", 0), *arm_runs(config)]:
        write_grid(tmp_path, name, [("none", full, 60.0)] + [(m, t, 50.0) for m in config.methods for t in budgets[1:]])
    return config, tmp_path


def test_accuracy_plot_has_budget_ticks_chance_and_one_legend(grids):
    config, out = grids
    names = ["stage1", "sft", "direct", "tcd"]
    figure = plot_accuracy(config, out, names, LABELS, out / "accuracy.png")
    assert (out / "accuracy.png").is_file() and len(figure.axes) == len(config.methods)
    for axis in figure.axes:
        assert list(axis.get_xticks()) == sorted(config.budgets) and axis.get_ylim() == (0, 100)
        (chance,) = [line for line in axis.get_lines() if line.get_label().startswith("chance")]
        assert chance.get_ydata()[0] == pytest.approx(100 / 6)  # the colour question: one colour in six
        models = [line for line in axis.get_lines() if line is not chance]
        assert len({line.get_marker() for line in models}) == len(names)
        assert len({tuple(line.get_xdata()) for line in models}) == len(names)  # equal scores stay visible
        assert axis.get_legend() is None
    assert len(figure.legends) == 1
    assert "(--quick)" in figure._suptitle.get_text() and "colour question" in figure._suptitle.get_text()


def test_headline_plot_shows_chance_on_a_fixed_axis(grids):
    config, out = grids
    figure = plot_headline(config, out, ["direct", "tcd", "tcd-nokd"], SHORT, out / "headline.png")
    for axis, tokens in zip(figure.axes, config.headline_budgets, strict=True):
        assert axis.get_ylim() == (0, 100) and f"{tokens} of {config.image_tokens} tokens" in axis.get_title()
        assert any(line.get_label().startswith("chance") for line in axis.get_lines())
