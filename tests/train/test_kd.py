"""LLaVA-KD training: the step against full forwards, stages and their frozen parts, teacher checks, end to end."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import epic
from epic.data.shapes import SynthConfig, vocabulary_texts
from epic.distill import (
    StepPlan,
    distilled_positions,
    kd_loss,
    kl_rows,
    relation_loss,
    relation_rows,
    visual_kd_loss,
    visual_kd_rows,
)
from epic.models.factory import build_tiny_llava_with_processor, save_llava, tiny_processor, word_tokenizer
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from epic.train.config import parse_recipe
from epic.train.kd import KDStep, KDWeights, kd_weights
from epic.train.run import build_model, build_trainer, prepare_model, run_training
from epic.train.step import Compressor, StepContext, StepOutput
from epic.train.teacher import check_same_tokenizer, check_teacher
from tests.helpers import Row, make_batch
from tests.train.conftest import tiny_options
from tests.train.test_distributed import TORCHRUN, assert_same_weights, train_on_two_processes

SPEC = TinyLlavaSpec()  # 64 visual tokens, vocabulary 256, image token 255
TEACHER_SPEC = TinyLlavaSpec(vocab_size=260, image_token_index=255, hidden_size=96, intermediate_size=192, num_layers=5)
VOCAB = 250  # the "tokenizer": fewer tokens than either padded LM head (256 and 260 columns)
ROWS = [Row(answer=4), Row(images=2, before=2, answer=3), Row(images=0, answer=5), Row(before=9, answer=2)]
TEACHER_SHAPE = {"hidden_size": 96, "intermediate_size": 192, "num_layers": 5}  # wider and deeper than the student


def models() -> tuple[LlavaForConditionalGeneration, LlavaForConditionalGeneration]:
    return build_tiny_llava(SPEC), build_tiny_llava(TEACHER_SPEC, seed=1)


def kd_step(student, teacher, batch, plan: StepPlan, weights: KDWeights | None = None) -> StepOutput:
    """One KD step of an unwrapped student, each micro-batch normalised by its own counts."""
    step = KDStep(teacher, weights or KDWeights(), VOCAB, Compressor("dart"))
    return step(student, batch, StepContext(student, plan, seed=0))


@pytest.mark.parametrize("padding", ["right", "left"])
def test_kd_step_matches_full_forwards(padding):
    """Every part against full [B, L, V] forwards of both models, on a padded batch with a two-image row and a row
    without an image; logits compared on the shared columns only."""
    student, teacher = models()
    batch = make_batch(SPEC, ROWS, padding)
    full = student(**batch)
    with torch.no_grad():
        teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits[..., :VOCAB]
    student_logits = full.logits[..., :VOCAB]
    ids, labels = batch["input_ids"], batch["labels"]
    parts = {
        "ce": full.loss,
        "res": kd_loss(student_logits, teacher_logits, labels),
        "vis": visual_kd_loss(student_logits, teacher_logits, ids, 255, SPEC.image_tokens),
        "rel": relation_loss(student_logits, teacher_logits, ids, 255, SPEC.image_tokens),
    }
    weights = KDWeights(response=1.0, visual=0.7, relation=0.5)
    result = kd_step(student, teacher, batch, StepPlan(None, 2, None, 4, 4), weights)
    assert list(result.parts) == list(parts)
    for name, value in parts.items():
        torch.testing.assert_close(result.parts[name].value, value.detach(), atol=1e-5, rtol=1e-4)
    expected = parts["ce"] + parts["res"] + 0.7 * parts["vis"] + 0.5 * parts["rel"]
    torch.testing.assert_close(result.loss, expected.detach(), atol=1e-5, rtol=1e-4)
    assert result.parts["vis"].count == result.parts["rel"].count == 4 and result.student is None
    result.loss.backward()
    assert all(parameter.grad is None for parameter in teacher.parameters())
    assert student.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("padding", ["right", "left"])
def test_kd_tcd_step_distils_the_visual_tokens_the_student_kept(padding):
    """A compressed student: L_vis and L_rel over its kept visual tokens, against the teacher's (full tokens) rows at
    the same original positions; CE and L_res at every response position."""
    student, teacher = models()
    batch = make_batch(SPEC, ROWS, padding)
    ratio, kept = 1 - 10 / 64, 10
    with torch.no_grad(), epic.compress(student, "dart", ratio=ratio, layer=2) as compression:
        out = student(**batch)
        teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits[..., :VOCAB]
    slots = compression.original_positions.clamp(min=0)
    real = compression.original_positions >= 0
    rows = torch.arange(len(ROWS))[:, None].expand_as(slots)
    visual = real & (batch["input_ids"] == 255).gather(1, slots)
    response = real & distilled_positions(batch["labels"]).gather(1, slots)
    student_logits = out.logits[..., :VOCAB]

    def teacher_at(mask):
        return teacher_logits[rows[mask], slots[mask]]

    result = kd_step(student, teacher, batch, StepPlan(ratio, 2, None, 4, 4))
    result.student.remove()
    parts = {name: part.value for name, part in result.parts.items()}
    assert int(visual.sum()) == kept * 4
    torch.testing.assert_close(parts["ce"], out.loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        parts["res"], kl_rows(student_logits[response], teacher_at(response)), atol=1e-5, rtol=1e-4
    )
    vis_student, vis_teacher = student_logits[visual], teacher_at(visual)
    torch.testing.assert_close(parts["vis"], visual_kd_rows(vis_student, vis_teacher, kept), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(parts["rel"], relation_rows(vis_student, vis_teacher, kept), atol=1e-5, rtol=1e-4)


def test_weight_presets():
    assert kd_weights() == KDWeights(1.0, 1.0, 1.0)
    assert kd_weights("paper") == KDWeights(1.0, 1.0, 0.5)
    assert kd_weights("paper", relation=0.25, visual=2.0) == KDWeights(1.0, 2.0, 0.25)
    with pytest.raises(ValueError, match="unknown KD weight preset 'best'"):
        kd_weights("best")
    with pytest.raises(ValueError, match=">= 0"):
        kd_weights(response=-1.0)


def trainable(model) -> set[str]:
    parts = {"model.vision_tower": "vision", "model.multi_modal_projector": "projector"}
    names = set()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            names.add(next((part for prefix, part in parts.items() if name.startswith(prefix)), "llm"))
    return names


def test_stages_freeze_and_unfreeze_the_right_parts():
    model = build_tiny_llava()
    stages = [
        ("kd-pretrain", [], {"projector"}),
        ("kd-finetune", [], {"projector", "llm"}),
        ("kd-pretrain", ["--freeze_vision_tower", "false"], {"projector"}),  # the projector only, whatever else
        ("sft", ["--freeze_language_model", "true"], {"projector"}),  # plain pre-training (PT)
        ("sft", [], {"projector", "llm"}),
        ("kd-tcd", ["--freeze_vision_tower", "false"], {"vision", "projector", "llm"}),
    ]
    for mode, extra, expected in stages:
        *_, distill_args, _ = parse_recipe(None, ["--output_dir", "x", "--mode", mode, *extra])
        assert trainable(prepare_model(model, distill_args)) == expected, mode


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny teacher checkpoint, wider and deeper than the student, with the student's tokenizer."""
    folder = tmp_path_factory.mktemp("kd-teacher")
    model, processor = build_tiny_llava_with_processor(
        vocabulary_texts(SynthConfig()), TinyLlavaSpec(**TEACHER_SHAPE), seed=1
    )
    save_llava(model, processor, folder, "vicuna_v1")
    return folder


def kd_options(shapes, output_dir, teacher, mode="kd-finetune", **overrides) -> list[str]:
    """`tiny_options` of a KD run, the student at full tokens (kd-tcd adds `--tokens`)."""
    argv = tiny_options(shapes, output_dir, mode=mode, teacher=teacher, **overrides)
    index = argv.index("--tokens")
    return argv[:index] + argv[index + 2 :]


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


@pytest.mark.parametrize(
    ("mode", "changes"),
    [("kd-pretrain", {"projector"}), ("kd-finetune", {"projector", "llm"}), ("kd-tcd", {"projector", "llm"})],
)
def test_one_kd_step_per_mode_logs_the_parts_and_trains_the_stage(shapes, tmp_path, teacher_dir, mode, changes):
    argv = kd_options(shapes, tmp_path, teacher_dir, mode, max_steps=1, save_strategy="steps", save_steps=1)
    argv += ["--tokens", "7"] if mode == "kd-tcd" else []
    model_args, *_ = parse_recipe(None, argv)
    before = parameters(build_model(model_args)[0])
    final = run_training(*parse_recipe(None, argv))
    after = parameters(LlavaForConditionalGeneration.from_pretrained(final))
    changed = {
        "vision" if "vision_tower" in name else "projector" if "projector" in name else "llm"
        for name in before
        if not torch.equal(before[name], after[name])
    }
    assert changed == changes
    logged = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())["log_history"][0]
    parts = [logged[f"{name}_loss"] for name in ("ce", "res", "vis", "rel")]
    assert all(value > 0 for value in parts)
    assert logged["loss"] == pytest.approx(sum(parts), rel=1e-4)
    if mode == "kd-tcd":
        assert 0 < logged["student_ratio"] < 1 and logged["kept_tokens"] < 64 and "teacher_ratio" not in logged


def test_kd_finetune_saves_a_loadable_checkpoint(shapes, tmp_path, teacher_dir, caplog):
    argv = kd_options(shapes, tmp_path, teacher_dir, max_steps=2, save_strategy="steps", save_steps=2)
    final = run_training(*parse_recipe(None, argv))
    for folder in (final, tmp_path / "checkpoint-2"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True)
        messages = " ".join(str(w.message) for w in caught).lower() + caplog.text.lower()
        assert "missing" not in messages and "unexpected" not in messages
        assert model.config.text_config.hidden_size == 64  # the student, not the teacher
    history = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "rel_loss" in entry] == [1, 2]


def test_the_teacher_is_frozen_outside_the_optimizer_and_never_changes(shapes, tmp_path, teacher_dir):
    argv = kd_options(shapes, tmp_path, teacher_dir, max_steps=2, teacher_dtype="bfloat16")
    trainer = build_trainer(*parse_recipe(None, argv))
    teacher = trainer.step.teacher
    before = parameters(teacher)
    trainer.train()
    assert not teacher.training and next(teacher.parameters()).dtype == torch.bfloat16
    assert all(not parameter.requires_grad and parameter.grad is None for parameter in teacher.parameters())
    optimized = {id(parameter) for group in trainer.optimizer.param_groups for parameter in group["params"]}
    assert optimized and not optimized & {id(parameter) for parameter in teacher.parameters()}
    assert not any(module is teacher for module in trainer.model.modules())
    assert all(torch.equal(before[name], parameter) for name, parameter in teacher.named_parameters())


def test_a_teacher_with_another_tokenizer_is_refused_naming_the_first_difference(shapes, tmp_path):
    texts = vocabulary_texts(SynthConfig())
    student, other = word_tokenizer(texts), word_tokenizer([*texts, "aardvark"])
    with pytest.raises(ValueError, match=r"first at id \d+, student '[^']+', teacher 'aardvark'"):
        check_same_tokenizer(student, other)
    check_same_tokenizer(student, word_tokenizer(texts))
    model, _ = build_tiny_llava_with_processor([*texts, "aardvark"], TinyLlavaSpec(**TEACHER_SHAPE))
    save_llava(model, tiny_processor(TinyLlavaSpec(), other), tmp_path / "teacher", "vicuna_v1")
    argv = kd_options(shapes, tmp_path / "run", tmp_path / "teacher", max_steps=1)
    with pytest.raises(ValueError, match=r"tokenizer differs from the student's .* teacher 'aardvark'"):
        run_training(*parse_recipe(None, argv))


def test_a_teacher_that_normalises_pixels_otherwise_is_refused():
    """The teacher reads the student's pixel values: another mean or std would feed it images it was not trained on."""
    texts = vocabulary_texts(SynthConfig())
    student, processor = build_tiny_llava_with_processor(texts)
    teacher, teacher_processor = build_tiny_llava_with_processor(texts, TinyLlavaSpec(**TEACHER_SHAPE), seed=1)
    check_teacher(student, processor, teacher.config, teacher_processor)
    teacher_processor.image_processor.image_mean = (0.5, 0.5, 0.5)  # SigLIP's, against CLIP's
    with pytest.raises(ValueError, match=r"teacher's image processor has image_mean=\[0\.5, 0\.5, 0\.5\], the student"):
        check_teacher(student, processor, teacher.config, teacher_processor)


def test_a_teacher_with_another_visual_token_count_is_refused(shapes, tmp_path):
    spec = TinyLlavaSpec(**TEACHER_SHAPE, patch_size=8)  # 48 px / 8 = 36 visual tokens, the student has 64
    model, processor = build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), spec)
    save_llava(model, processor, tmp_path / "teacher", "vicuna_v1")
    argv = kd_options(shapes, tmp_path / "run", tmp_path / "teacher", max_steps=1)
    with pytest.raises(ValueError, match="the teacher sees 36 visual tokens per image and the student 64"):
        run_training(*parse_recipe(None, argv))


@pytest.mark.parametrize(
    ("mode", "extra", "message"),
    [
        ("kd-finetune", ["--teacher", ""], "give --teacher"),
        ("kd-tcd", ["--teacher", "tiny:llama", "--tokens", "7"], "give --teacher"),
        ("tcd", ["--tokens", "7"], "used by the LLaVA-KD modes"),
        ("kd-finetune", ["--tokens", "7"], "use kd-tcd"),
        ("kd-tcd", [], "needs a target budget"),
        ("kd-finetune", ["--kd_weights", "best"], "unknown KD weight preset"),
        ("kd-finetune", ["--rel_weight", "-1"], ">= 0"),
        ("kd-finetune", ["--teacher_dtype", "int8"], "unknown teacher_dtype"),
        ("kd-pretrain", ["--freeze_projector", "true"], "projector only"),
    ],
)
def test_bad_kd_options_fail_before_any_compute(shapes, tmp_path, teacher_dir, mode, extra, message):
    argv = kd_options(shapes, tmp_path, teacher_dir, mode, max_steps=1)
    with pytest.raises(ValueError, match=message):
        run_training(*parse_recipe(None, argv + extra))


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(shapes, tmp_path, teacher_dir):
    """Token parts are divided by the accumulated batch's token count, image parts by its image count: two
    micro-batches of 2 rows step as one batch of 4 (plain SGD, so the step shows the gradient's scale)."""
    weights = []
    for rows, accumulation in ((4, 1), (2, 2)):
        argv = kd_options(
            shapes,
            tmp_path / str(rows),
            teacher_dir,
            max_steps=1,
            per_device_train_batch_size=rows,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=1.0,
        )
        weights.append(
            parameters(LlavaForConditionalGeneration.from_pretrained(run_training(*parse_recipe(None, argv))))
        )
    changed = [name for name in weights[0] if "projector" in name or "layers.3" in name]
    for name in changed:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed beside this Python")
def test_zero3_on_two_processes_matches_one_process(shapes, tmp_path, teacher_dir):
    """Two CPU processes under ZeRO-3 (the student partitioned, each rank's teacher whole, images counted across
    ranks) end with the weights of one process accumulating two micro-batches."""
    pytest.importorskip("deepspeed")
    common = {"max_steps": 2, "learning_rate": 0.1, "optim": "sgd", "per_device_train_batch_size": 4}
    one = kd_options(shapes, tmp_path / "one", teacher_dir, gradient_accumulation_steps=2, **common)
    single = run_training(*parse_recipe(None, one))
    config = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed" / "zero3.json"
    train_on_two_processes(kd_options(shapes, tmp_path / "two", teacher_dir, deepspeed=config, **common))
    assert_same_weights(single, tmp_path / "two" / "final")
