"""Training options: LoRA, per-part learning rates, gradient checkpointing, logging, starting from parts."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from epic.data.shapes import SynthConfig, vocabulary_texts
from epic.train.config import parse_recipe
from epic.train.consistency import ConsistencyStep
from epic.train.run import build_model, build_trainer, run_training
from epic.train.trainer import llava_of
from tests.helpers import save_tiny_parts
from tests.train.conftest import tiny_options


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def test_lora_trains_adapters_and_saves_a_merged_plain_model(shapes, tmp_path):
    pytest.importorskip("peft")
    argv = tiny_options(shapes, tmp_path, max_steps=2, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model_args, *_ = parse_recipe(None, argv)
    before = parameters(build_model(model_args)[0])
    final = run_training(*parse_recipe(None, argv))
    after = parameters(LlavaForConditionalGeneration.from_pretrained(final))
    assert before.keys() == after.keys()  # merged: no LoRA names left
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(".self_attn.q_proj" in name for name in changed)
    assert any("multi_modal_projector" in name for name in changed)
    assert not any("vision_tower" in name or "embed_tokens" in name for name in changed)


def test_the_projector_trains_at_its_own_learning_rate(shapes, tmp_path):
    argv = tiny_options(shapes, tmp_path, max_steps=2, projector_lr=0.01, save_strategy="steps", save_steps=2)
    run_training(*parse_recipe(None, argv))
    optimizer = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)
    rates = sorted({group["initial_lr"] for group in optimizer["param_groups"]})
    assert rates == [1e-3, 0.01]


def one_sgd_step(shapes, output_dir, checkpointing: bool) -> tuple[bool, int, float, dict[str, torch.Tensor]]:
    """One TCD step (plain SGD at lr 1, so the weights show the gradient): whether the model checkpoints, how often
    its first decoder layer's MLP ran, the logged loss, and the weights after the step."""
    argv = tiny_options(
        shapes, output_dir, max_steps=1, activation_checkpointing=checkpointing, optim="sgd", learning_rate=1.0
    )
    trainer = build_trainer(*parse_recipe(None, argv))
    runs = []  # a pre-hook: checkpoint's recompute stops once it has what backward needs, before a module returns
    first_layer = llava_of(trainer.model).model.language_model.layers[0]
    first_layer.mlp.register_forward_pre_hook(lambda module, args: runs.append(args[0].shape))
    trainer.train()
    checkpointing_on = llava_of(trainer.model).is_activation_checkpointing
    return checkpointing_on, len(runs), trainer.state.log_history[0]["loss"], parameters(trainer.model)


def test_gradient_checkpointing_recomputes_the_layers_in_backward_and_changes_no_gradient(shapes, tmp_path):
    """With checkpointing the layers below the compression run again in backward (the student's compression still
    attached); the loss and the step's gradients are those of the run without it."""
    plain_on, plain_runs, plain_loss, plain = one_sgd_step(shapes, tmp_path / "plain", checkpointing=False)
    on, runs, loss, checkpointed = one_sgd_step(shapes, tmp_path / "checkpointed", checkpointing=True)
    assert not plain_on and on
    assert plain_runs == 1 and runs == 2  # the student's forward; the teacher resumes from layer 2
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    for name, weight in plain.items():
        torch.testing.assert_close(checkpointed[name], weight, atol=1e-5, rtol=1e-4, msg=name)


def test_every_step_logs_schedule_and_losses(shapes, tmp_path):
    for mode in ("tcd", "lcd"):
        argv = tiny_options(shapes, tmp_path / mode, mode=mode, max_steps=2, save_strategy="steps", save_steps=2)
        run_training(*parse_recipe(None, argv))
        history = json.loads((tmp_path / mode / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
        logged = history[0]
        assert {"loss", "ce_loss", "kd_loss", "kept_tokens"} <= logged.keys()
        if mode == "tcd":
            assert {"student_ratio", "teacher_ratio", "gap"} <= logged.keys()
            assert logged["gap"] == pytest.approx(logged["student_ratio"] - logged["teacher_ratio"], abs=1e-5)
        else:
            assert logged["student_layer"] == 3 and logged["teacher_layer"] == 4


def test_training_from_parts(shapes, tmp_path):
    save_tiny_parts(tmp_path, vocabulary_texts(SynthConfig()), llm_layers=4)
    argv = tiny_options(shapes, tmp_path / "run", model="", max_steps=1)
    argv = [a for a in argv if a not in ("--model", "")] + [
        "--vision_tower",
        str(tmp_path / "vision"),
        "--language_model",
        str(tmp_path / "llm"),
        "--projector",
        str(tmp_path / "projector.safetensors"),
    ]
    final = run_training(*parse_recipe(None, argv))
    model = LlavaForConditionalGeneration.from_pretrained(final)
    assert model.config.image_seq_length == 64
    assert (final / "epic.json").is_file()


def test_alpha_zero_trains_without_a_teacher_pass(shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(ConsistencyStep, "_teacher_rows", lambda *a, **k: pytest.fail("a teacher pass ran"))
    argv = tiny_options(shapes, tmp_path, mode="tcd", alpha=0.0, max_steps=2, save_strategy="steps", save_steps=2)
    run_training(*parse_recipe(None, argv))
    history = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    logged = history[0]
    assert "kd_loss" not in logged and logged["ce_loss"] == pytest.approx(logged["loss"], rel=1e-4)
    assert 0 < logged["student_ratio"] < 1


def test_schedule_hold_trains_at_the_target_budget(shapes, tmp_path):
    target = 1 - 7 / 64
    argv = tiny_options(
        shapes,
        tmp_path,
        mode="tcd",
        max_steps=4,
        schedule_hold=0.5,
        r_min_end=target,
        save_strategy="steps",
        save_steps=4,
    )
    run_training(*parse_recipe(None, argv))
    history = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    kept = [entry["kept_tokens"] for entry in history if "kept_tokens" in entry]
    assert len(kept) == 4 and kept[2:] == [7, 7] and kept[0] > 7  # steps 2 and 3 of 4: progress >= 1 - hold
