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
    assert config.spec().image_tokens == config.image_tokens
    assert config.budgets[0] == config.image_tokens


def test_quick_is_the_same_pipeline_smaller():
    full, quick = demo_config(), demo_config(quick=True)
    assert quick.base_steps < full.base_steps and quick.n_test < full.n_test
    assert quick.budgets == full.budgets and quick.methods == full.methods


def test_base_key_ignores_comparison_settings_only():
    config = demo_config()
    assert replace(config, extra_steps=1, extra_lr=1.0).base_key() == config.base_key()
    assert replace(config, base_steps=1).base_key() != config.base_key()
    assert replace(config, n_captions=1).base_key() != config.base_key()


def test_bad_question_types_are_refused():
    with pytest.raises(ValueError, match="question_types"):
        demo_config(question_types=("colour", "smell")).synth()
