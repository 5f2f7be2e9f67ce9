"""The `epic` command line."""

from __future__ import annotations

import pytest

from epic.cli import main
from epic.demo import scaled_budgets


def test_paper_budgets_scale_to_the_image():
    assert scaled_budgets(576) == [576, 192, 128, 64, 36]
    assert scaled_budgets(144) == [144, 48, 32, 16, 9]


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["frobnicate"])
