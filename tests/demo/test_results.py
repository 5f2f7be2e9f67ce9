"""The reports' one rule for calling a difference: beyond the sum of the two seed spreads, never on single runs."""

from __future__ import annotations

import pytest

from epic.demo.results import compare, spread, verdict


def test_a_difference_is_called_only_beyond_the_summed_spreads():
    assert compare([80.0, 82.0, 84.0], [70.0, 71.0, 72.0]) == (pytest.approx(11.0), True)
    difference, called = compare([80.0, 82.0, 84.0], [78.0, 80.0, 82.0])  # 2 points apart, spreads 2 + 2
    assert difference == pytest.approx(2.0) and not called
    assert compare([90.0], [50.0]) == (40.0, False)  # two single runs: nothing to measure the spread by
    assert compare([80.0, 82.0, 84.0], [70.0]) == (pytest.approx(12.0), True)


def test_verdicts_say_which_side_and_by_how_much():
    assert verdict("TCD", [70.0, 71.0, 72.0], "direct", [80.0, 82.0, 84.0]).startswith("TCD is behind direct by 11.0")
    assert "within the seed spread" in verdict("TCD", [80.0, 82.0, 84.0], "direct", [78.0, 80.0, 82.0])
    assert "not called" in verdict("TCD", [90.0], "direct", [50.0])
    assert spread([67.0, 68.0]) == "67.5 ± 0.7" and spread([51.4]) == "51.4"
