"""The demo's settings: the paper's budgets mapped onto N tokens, and what the cached base model depends on."""

from __future__ import annotations

from dataclasses import replace

import pytest

from epic.demo import demo_config, scaled_budgets


def test_paper_budgets_map_proportionally():
    assert scaled_budgets(576) == [576, 192, 128, 64, 36]
    assert scaled_budgets(144) == [144, 48, 32, 16, 9]
    assert scaled_budgets(64) == [64, 21, 14, 7, 4]


def test_headline_budget_is_n_over_nine_and_n_is_in_range():
    config = demo_config()
    assert 64 <= config.image_tokens <= 256
    assert config.target_tokens == round(config.image_tokens / 9)
    assert config.headline_budgets == [config.target_tokens, round(config.image_tokens / 16)]
    assert config.spec().image_tokens == config.image_tokens
    assert config.budgets[0] == config.image_tokens


def test_quick_is_the_same_pipeline_smaller():
    full, quick = demo_config(), demo_config(quick=True)
    assert quick.stage1_steps < full.stage1_steps and quick.n_test < full.n_test
    assert quick.budgets == full.budgets and quick.methods == full.methods


def test_stage1_key_ignores_stage2_settings_only():
    config = demo_config()
    assert replace(config, stage2_steps=1, stage2_lr=1.0, hold=0.5, seeds=1).stage1_key() == config.stage1_key()
    assert replace(config, stage1_steps=1).stage1_key() != config.stage1_key()
    assert replace(config, stage1_captions=1).stage1_key() != config.stage1_key()
    assert demo_config(from_base=True).stage1_key() != config.stage1_key()


def test_stage1_sees_other_scenes_and_other_questions_than_stage2():
    config = demo_config()
    stage1, stage2 = config.stage1_synth(), config.synth()
    assert stage1.seed != stage2.seed and not set(stage1.question_types) & set(stage2.question_types)
    assert stage1.n_captions > 0 and stage2.n_captions == 0 and stage1.caption_style == "places"


def test_from_base_is_the_earlier_experiment():
    config = demo_config(from_base=True)
    assert config.stage1_name == "base" and config.stage1_types == config.question_types
    assert config.stage2_steps < demo_config().stage2_steps and config.hold == 0


def test_bad_question_types_are_refused():
    with pytest.raises(ValueError, match="question_types"):
        demo_config(question_types=("colour", "smell")).synth()
