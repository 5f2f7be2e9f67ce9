"""Schedules: shapes, presets, validation, and draws that depend only on the step."""

from __future__ import annotations

import pytest
import torch

from epic.distill import (
    Curriculum,
    LayerSchedule,
    TokenSchedule,
    released_token_schedule,
    step_generator,
    target_token_schedule,
)


def test_released_preset_matches_the_published_code():
    schedule = released_token_schedule()
    for p in (0.0, 0.25, 0.5, 1.0):
        low, high = schedule.ratio_range(p)
        assert low == pytest.approx(0.1 + 0.16 * p) and high == pytest.approx(0.1 + 0.64 * p)
        assert schedule.gap(p) == pytest.approx(min(0.1 + 0.5 * p, 0.3))
    assert schedule.ratio_range(1.0)[1] == pytest.approx(0.74)  # stops at ~148 of 576 tokens


def test_target_preset_reaches_the_runs_target():
    schedule = target_token_schedule(0.889)
    assert schedule.ratio_range(0.0) == pytest.approx((0.1, 0.1))
    low, high = schedule.ratio_range(1.0)
    assert high == pytest.approx(0.889) and low == pytest.approx(0.1 + 0.25 * 0.789)
    assert round(576 * (1 - high)) == 64


def test_draws_lie_in_range_and_teacher_is_milder():
    schedule = target_token_schedule(0.9)
    for step in range(200):
        p = step / 199
        student, teacher = schedule.sample(p, step_generator(0, step))
        low, high = schedule.ratio_range(p)
        assert low <= student <= high
        assert teacher == pytest.approx(max(student - schedule.gap(p), 0.0))
        assert 0.0 <= teacher <= student


def test_draws_depend_only_on_seed_step_and_stream():
    schedule = released_token_schedule()
    first = [schedule.sample(0.5, step_generator(3, step, stream))[0] for step in range(5) for stream in range(2)]
    again = [schedule.sample(0.5, step_generator(3, step, stream))[0] for step in range(5) for stream in range(2)]
    assert first == again
    assert len(set(first)) == len(first)
    assert schedule.sample(0.5, step_generator(4, 1)) != schedule.sample(0.5, step_generator(3, 1))


def test_layer_schedule_moves_from_deep_to_shallow():
    schedule = LayerSchedule(num_layers=8, final_layer=2, gap_layers_max=3)
    assert schedule.layers(0.0) == (7, 8)  # teacher at L: uncompressed
    assert schedule.layers(1.0) == (2, 5)
    previous = 8
    for step in range(11):
        student, teacher = schedule.layers(step / 10)
        assert 2 <= student <= previous and student < teacher <= 8
        previous = student


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r_max_end": 1.0}, r"r_max_end must lie in \[0, 1\)"),
        ({"r_min_end": 0.8, "r_max_end": 0.7}, "range is empty"),
        ({"r_max_start": 0.5, "r_min_start": 0.5, "r_max_end": 0.3, "r_min_end": 0.2}, "ends before it starts"),
        ({"gap_start": -0.1}, "teacher must be milder"),
    ],
)
def test_bad_token_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenSchedule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"final_layer": 8}, "final_layer must lie"),
        ({"start_layer": 1, "final_layer": 3}, "ends before it starts"),
        ({"gap_layers_max": 0}, "teacher must be milder"),
    ],
)
def test_bad_layer_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerSchedule(num_layers=8, **kwargs)


def test_curriculum_per_mode():
    tokens, layers = target_token_schedule(0.8), LayerSchedule(num_layers=6, final_layer=2)
    generator = torch.Generator().manual_seed(0)
    sft = Curriculum("sft", 6, 2, 0.8).step(0.5, generator)
    assert sft.student_compresses and not sft.teacher_compresses
    assert not Curriculum("sft", 6, 2, None).step(0.5, generator).student_compresses
    tcd = Curriculum("tcd", 6, 2, 0.8, tokens=tokens).step(0.5, generator)
    assert tcd.student_layer == tcd.teacher_layer == 2 and tcd.teacher_ratio < tcd.student_ratio
    lcd = Curriculum("lcd", 6, 2, 0.8, layers=layers).step(0.0, generator)
    assert (lcd.student_ratio, lcd.student_layer, lcd.teacher_layer) == (0.8, 5, 6) and not lcd.teacher_compresses
    both = Curriculum("tcd+lcd", 6, 2, 0.8, tokens=tokens, layers=layers).step(1.0, generator)
    assert both.student_layer == 2 and both.teacher_ratio < both.student_ratio
    with pytest.raises(ValueError, match="unknown training mode 'kd'"):
        Curriculum("kd", 6, 2, 0.8)
    with pytest.raises(ValueError, match="needs a target budget"):
        Curriculum("tcd", 6, 2, None, tokens=tokens)


def test_hold_reaches_the_end_values_early_and_keeps_them():
    ramp, held = TokenSchedule(), TokenSchedule(hold=0.3)
    assert held.ratio_range(0.35) == pytest.approx(ramp.ratio_range(0.5))  # the ramp runs over the first 70%
    for progress in (0.7, 0.85, 1.0):
        assert held.ratio_range(progress) == pytest.approx(ramp.ratio_range(1.0))
        assert held.gap(progress) == pytest.approx(ramp.gap(1.0))
    assert held.ratio_range(0.69)[1] < ramp.ratio_range(1.0)[1]
    layers = LayerSchedule(num_layers=6, final_layer=2, hold=0.5)
    assert layers.layers(0.0) == (5, 6) and layers.layers(0.5) == layers.layers(0.9) == (2, 4)
    assert layers.layers(0.25) == LayerSchedule(num_layers=6, final_layer=2).layers(0.5)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="hold"):
            TokenSchedule(hold=bad)
        with pytest.raises(ValueError, match="hold"):
            LayerSchedule(num_layers=6, hold=bad)
