"""The mode table: the names users type, what each enables, and one line for an unknown name."""

from __future__ import annotations

import pytest
import torch

from epic.distill import MODES, TRAINING_MODES, Curriculum, target_token_schedule, training_mode


def test_the_names_users_type_are_the_table_s_keys():
    assert MODES == ("sft", "tcd", "lcd", "tcd+lcd", "kd-pretrain", "kd-finetune", "kd-tcd")
    assert all(TRAINING_MODES[name].name == name for name in MODES)


def test_each_mode_enables_what_its_name_says():
    enabled = {
        name: (mode.step, mode.token_schedule, mode.layer_schedule, mode.budget, mode.projector_only)
        for name, mode in TRAINING_MODES.items()
    }
    assert enabled == {
        "sft": ("sft", False, False, "optional", False),
        "tcd": ("consistency", True, False, "required", False),
        "lcd": ("consistency", False, True, "required", False),
        "tcd+lcd": ("consistency", True, True, "required", False),
        "kd-pretrain": ("kd", False, False, "refused", True),
        "kd-finetune": ("kd", False, False, "refused", False),
        "kd-tcd": ("kd", True, False, "required", False),
    }
    assert [name for name, mode in TRAINING_MODES.items() if mode.needs_teacher_model] == [
        "kd-pretrain",
        "kd-finetune",
        "kd-tcd",
    ]


def test_kd_tcd_draws_the_student_s_ratio_from_the_token_schedule_and_plans_no_teacher_pass():
    """kd-tcd's student follows TCD's schedule; its teacher is the separate model, so the plan compresses no teacher."""
    tokens, generator = target_token_schedule(0.8), torch.Generator().manual_seed(0)
    plan = Curriculum("kd-tcd", 6, 2, 0.8, tokens=tokens).step(1.0, generator)
    tcd = Curriculum("tcd", 6, 2, 0.8, tokens=tokens).step(1.0, torch.Generator().manual_seed(0))
    assert plan.student_ratio == tcd.student_ratio != 0.8
    assert plan.teacher_ratio is None and not plan.teacher_compresses and tcd.teacher_compresses


def test_an_unknown_mode_is_one_line_naming_the_known_ones():
    with pytest.raises(ValueError) as caught:
        training_mode("kd")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("unknown training mode 'kd'; choose one of ")
    assert all(f"'{name}'" in message for name in MODES)
