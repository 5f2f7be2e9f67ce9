"""Budget exposure replays a run from its own options: the kept tokens and rates the trainer really used."""

from __future__ import annotations

import json

import pytest

from epic.demo.exposure import budget_exposure, learning_rates
from epic.train.config import parse_recipe
from epic.train.run import run_training
from tests.train.conftest import tiny_options


def test_replay_matches_what_the_trainer_logged(shapes, tmp_path):
    argv = tiny_options(
        shapes,
        tmp_path,
        mode="tcd",
        max_steps=5,
        schedule_hold=0.4,
        r_min_end=1 - 7 / 64,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        save_strategy="steps",
        save_steps=5,
    )
    run_training(*parse_recipe(None, argv))
    history = json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "kept_tokens" in entry]
    seen = budget_exposure(argv, num_layers=4, image_tokens=64, budget=7)
    assert list(seen.kept_tokens) == [entry["kept_tokens"] for entry in logged]
    rates = learning_rates(parse_recipe(None, argv)[3])
    assert rates == pytest.approx([entry["learning_rate"] for entry in logged])  # warm-up, then cosine
    assert seen.steps_at_budget == 2 and seen.first_step_at_budget == 3
    assert seen.lr_share_at_budget == pytest.approx(sum(rates[3:]) / sum(rates))


def test_direct_training_is_all_at_the_budget_and_full_tokens_none(shapes, tmp_path):
    direct = budget_exposure(tiny_options(shapes, tmp_path, mode="sft", max_steps=10), 4, 64, 7)
    assert (direct.steps_at_budget, direct.lr_share_at_budget, direct.first_step_at_budget) == (10, 1.0, 0)
    full = tiny_options(shapes, tmp_path, mode="sft", max_steps=10)
    full = [arg for index, arg in enumerate(full) if arg != "--tokens" and full[index - 1] != "--tokens"]
    none = budget_exposure(full, 4, 64, 7)
    assert (none.steps_at_budget, none.lr_share_at_budget, none.mean_kept_tokens) == (0, 0.0, 64)
    released = budget_exposure(tiny_options(shapes, tmp_path, mode="tcd", max_steps=300), 4, 64, 7)
    assert released.steps_at_budget < 30  # the released ramp only touches the target at its very end
