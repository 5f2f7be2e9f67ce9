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


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_train_help_names_every_training_mode(capsys, monkeypatch, argv):
    from epic.distill import MODES

    monkeypatch.setenv("COLUMNS", "400")  # no line wrapped inside a mode's name
    with pytest.raises(SystemExit):
        main(argv)
    listed = capsys.readouterr().out
    assert "kd-pretrain" in MODES
    for mode in MODES:
        assert mode in listed, mode
