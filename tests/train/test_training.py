"""Training: options checked before compute, one step per mode, checkpoints, alignment of teacher and student."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainingArguments

import epic
from epic.data.templates import get_template
from epic.distill import Curriculum, StepPlan, distilled_positions, target_token_schedule
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from epic.train.config import parse_recipe
from epic.train.consistency import ConsistencyStep
from epic.train.run import build_curriculum, build_model, describe_compression, run_training
from epic.train.step import Compressor, SftStep, StepContext
from epic.train.trainer import EpicTrainer
from tests.helpers import Row, make_batch, reference_logits
from tests.train.conftest import tiny_options


def test_recipe_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("learning_rate: 0.5\nmode: lcd\nmethod_options: {pivots_image: 2}\n")
    recipe = tmp_path / "run.yaml"
    recipe.write_text("include: base.yaml\nmode: tcd\noutput_dir: out\ntokens: 7\n")
    _, _, distill_args, training_args = parse_recipe(recipe, ["--tokens", "9"])
    assert distill_args.mode == "tcd" and distill_args.tokens == 9
    assert training_args.learning_rate == 0.5 and distill_args.options() == {"pivots_image": 2}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['--warp_speed'"):
        parse_recipe(recipe, ["--warp_speed", "9"])


def test_recipe_keys_and_overrides_are_matched_exactly_not_by_prefix(tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text("mode: tcd\ntokens: 7\nmax_step: 3\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['max_step'\] \(did you mean max_steps\?\)"):
        parse_recipe(recipe)
    with pytest.raises(ValueError, match=r"\(did you mean --max_steps\?\); `epic train --options`"):
        parse_recipe(None, ["--max_step", "3"])
    assert parse_recipe(None, ["--max-steps", "3"])[3].max_steps == 3  # the dashed spelling is the same option


def test_compression_over_the_run_is_described_in_kept_tokens():
    """TCD at 7 of 64: R_max ramps 0.1 -> 1 - 7/64, R_min 0.1 -> 0.1 + (0.891 - 0.1) / 4 = 0.298 (45 kept)."""
    args = parse_recipe(None, ["--mode", "tcd", "--tokens", "7"])[2]
    words = describe_compression(build_curriculum(args, num_layers=4, image_tokens=64), "dart", 64)
    assert words == (
        "dart from layer 2, target 7 of 64 visual tokens; the student keeps 58 at the start, 7 to 45 at the end"
    )
    lcd = parse_recipe(None, ["--mode", "lcd", "--tokens", "7"])[2]
    assert describe_compression(build_curriculum(lcd, 4, 64), "dart", 64).endswith("moves from layer 3 to 2")
    sft = parse_recipe(None, ["--mode", "sft"])[2]
    assert describe_compression(build_curriculum(sft, 4, 64), "dart", 64) == "no compression (all 64 visual tokens)"


def test_training_starts_with_a_banner_of_what_it_runs(shapes, tmp_path, capsys):
    run_training(*parse_recipe(None, tiny_options(shapes, tmp_path, max_steps=1)))
    banner = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epic train:"))
    assert banner.startswith(f"epic train: tcd | 96 rows of {shapes / 'train.json'} | ")
    assert "M parameters trained | dart from layer 2, target 7 of " in banner
    assert banner.endswith(f"| 1 step | into {tmp_path}")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--mode", "kd"], "unknown training mode 'kd'"),
        (["--method", "pdropx"], "unknown compression method 'pdropx'"),
        (["--ratio", "1.2"], r"ratio must lie in \[0, 1\)"),
        (["--layer", "9"], r"layer must lie in \[0, 3\] \(0: before the LLM\)"),
        (["--layer", "0"], r"Dart scores with layer K-1's attention, so it cannot run before the LLM"),
        (["--r_max_start", "0.5", "--r_min_start", "0.5"], "ends before it starts"),
        (["--gap_start", "-0.2"], "teacher must be milder"),
        (["--mode", "lcd", "--lcd_gap_layers_max", "0"], "teacher must be milder"),
        (["--tokens", "65"], "larger than the image"),
        (["--teacher_method", "nope"], "unknown compression method 'nope'"),
        (["--mode", "sft", "--teacher_method", "fastv"], "teacher_method is the TCD/LCD teacher's method"),
        (["--method", "divprune", "--layer", "0", "--teacher_method", "fastv"], "FastV scores with layer K-1's"),
        (["--later_stages", "2:0.5"], r"strictly increasing layers; got layers \[2, 2\]"),
        (["--later_stages", "3:1.5"], r"later stage '3:1.5' in '3:1.5': write layer:fraction"),
        (["--later_stages", "9:0.5"], r"layer must be an integer in \[0, 3\]"),
        (["--mode", "lcd", "--later_stages", "3:0.5"], "later_stages follow a fixed layer K; mode 'lcd' moves K"),
        (["--mode", "sft", "--teacher_later_stages", ""], "teacher_later_stages is the TCD teacher's"),
    ],
)
def test_bad_options_fail_before_any_compute(overrides, message):
    budget = [] if "--ratio" in overrides else ["--tokens", "7"]
    *_, distill_args, _ = parse_recipe(None, ["--output_dir", "x", "--mode", "tcd", *budget, *overrides])
    with pytest.raises(ValueError, match=message):
        build_curriculum(distill_args, num_layers=4, image_tokens=64)


def flat_parameters(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("sft", ["--tokens", "7"]),
        ("tcd", []),
        ("tcd", ["--method", "divprune", "--layer", "0"]),  # before the LLM
        ("tcd", ["--method", "pdrop"]),  # a student pruning in stages (layers 2 and 3 of 4)
        ("tcd", ["--method", "visionzip", "--layer", "0"]),  # reads the vision tower; its teacher, the student's record
        ("lcd", []),
        ("tcd+lcd", []),
    ],
)
def test_one_step_changes_only_the_trainable_parts(shapes, tmp_path, mode, extra):
    argv = tiny_options(shapes, tmp_path / mode, mode=mode, max_steps=1)
    model_args, data_args, distill_args, training_args = parse_recipe(None, argv + extra)
    before = flat_parameters(build_model(model_args)[0])
    final = run_training(model_args, data_args, distill_args, training_args)
    after = flat_parameters(LlavaForConditionalGeneration.from_pretrained(final))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert not any(name.startswith("model.vision_tower") for name in changed)
    assert any(name.startswith("model.multi_modal_projector") for name in changed)
    assert any(name.startswith("model.language_model.layers.3") for name in changed)


def test_the_tcd_teacher_compresses_with_its_own_method(shapes, tmp_path, monkeypatch):
    """--teacher_method: the student compresses with DART and the teacher, resumed from the student's prefix, with
    FastV at the schedule's milder budget, every step."""
    import epic.train.step as step_module

    attached = []
    real = step_module.compress

    def recording(model, method, **kwargs):
        attached.append((method, kwargs["record_prefix"]))
        return real(model, method, **kwargs)

    monkeypatch.setattr(step_module, "compress", recording)
    argv = tiny_options(shapes, tmp_path, max_steps=2, teacher_method="fastv")
    run_training(*parse_recipe(None, argv))
    assert attached == [("dart", True), ("fastv", False)] * 2  # per step: the student (records), then the teacher


def test_later_stages_prune_the_student_again_and_the_teacher_as_told(shapes, tmp_path, monkeypatch):
    """--later_stages 3:0.5: the student prunes at K = 2 as the schedule says, then drops half of that at layer 3;
    --teacher_later_stages '' leaves the teacher one stage, at its milder ratio."""
    import epic.train.step as step_module

    handles = []
    real = step_module.compress

    def recording(model, method, **kwargs):
        handles.append(real(model, method, **kwargs))
        return handles[-1]

    monkeypatch.setattr(step_module, "compress", recording)
    argv = tiny_options(shapes, tmp_path, max_steps=2, later_stages="3:0.5", teacher_later_stages="")
    run_training(*parse_recipe(None, argv))
    students, teachers = handles[0::2], handles[1::2]
    assert len(students) == len(teachers) == 2
    for student, teacher in zip(students, teachers, strict=True):
        first, second = (len(kept[0]) for kept in student.stage_kept)
        assert [stage.layer for stage in student.stages] == [2, 3]
        assert second == round(64 * (1 - student.stages[1].budget.ratio)) and second < first
        assert abs((1 - student.stages[1].budget.ratio) - (1 - student.stages[0].budget.ratio) / 2) < 1e-9
        assert [stage.layer for stage in teacher.stages] == [2]
        assert teacher.stages[0].budget.ratio < student.stages[0].budget.ratio


def test_checkpoint_loads_with_plain_transformers(shapes, tmp_path, caplog):
    argv = tiny_options(shapes, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    final = run_training(*parse_recipe(None, argv))
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / ".complete").is_file() and (checkpoint / "epic.json").is_file()
    for folder in (final, checkpoint):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True)
            AutoProcessor.from_pretrained(folder, local_files_only=True)
        messages = " ".join(str(w.message) for w in caught).lower() + caplog.text.lower()
        assert "missing" not in messages and "unexpected" not in messages
        assert (folder / "model.safetensors").is_file()
        assert model.config.image_token_id == AutoProcessor.from_pretrained(folder).image_token_id
        served = AutoProcessor.from_pretrained(folder, local_files_only=True)
        assert served.chat_template == get_template("vicuna_v1").chat_template()  # the template it trained with


def test_teacher_and_student_rows_align_through_original_positions():
    """Logits asked at original positions come back in the same order whatever each pass kept."""
    model = build_tiny_llava()
    spec = TinyLlavaSpec()
    batch = make_batch(spec, [Row(answer=4), Row(before=9, answer=2), Row(images=0)], "right")
    labels = batch.pop("labels")
    wanted = distilled_positions(labels)
    rows = {}
    with torch.no_grad():
        for name, tokens in (("teacher", 20), ("student", 5)):
            with epic.compress(model, "dart", tokens=tokens) as state:
                rows[name] = (model(**batch, logits_to_keep=wanted).logits, state.kept)
    for logits, kept in rows.values():
        reference = reference_logits(model, batch, kept, layer=2)
        torch.testing.assert_close(logits, reference[wanted], atol=1e-4, rtol=0)
    assert rows["teacher"][0].shape == rows["student"][0].shape == (int(wanted.sum()), spec.vocab_size)


def test_logits_at_dropped_positions_are_refused():
    model = build_tiny_llava()
    batch = make_batch(TinyLlavaSpec(), [Row()], labels=False)
    wanted = batch["input_ids"] == model.config.image_token_id
    refused = pytest.raises(ValueError, match=r"dropped|image tokens after")  # the first True ends the prompt
    with refused, torch.no_grad(), epic.compress(model, "fastv", tokens=4):
        model(**batch, logits_to_keep=wanted)


def test_distillation_selects_from_the_prompt_as_a_forward_with_labels_does():
    """The consistency step passes no labels to the model (it asks for logits rows instead); what it keeps must
    still be chosen from the prompt only, as in SFT and at inference."""
    model = build_tiny_llava()
    batch = make_batch(TinyLlavaSpec(), [Row(answer=6), Row(before=9, answer=3)], "right")
    for method in ("fastv", "dart"):
        with torch.no_grad(), epic.compress(model, method, tokens=5) as with_labels:
            model(**batch)
        context = StepContext(model, StepPlan(1 - 5 / 64, 2, 0.0, 2, 4), seed=0)
        result = ConsistencyStep(Compressor(method), alpha=0.5)(model, batch, context)
        result.student.remove()
        assert [k.tolist() for k in result.student.kept] == [k.tolist() for k in with_labels.kept]


def test_training_compresses_the_student_to_the_budget_each_step_draws(shapes, tmp_path, monkeypatch):
    """Compression is on in training: in every step the student kept round((1 - drawn ratio) * 64) visual tokens of
    each image, fewer than the 64 it sees uncompressed, and the steps log that count."""
    seen = []
    step = ConsistencyStep.__call__

    def recording(self, model, inputs, context):
        output = step(self, model, inputs, context)
        images = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1) // 64  # per row
        seen.append(([len(kept) for kept in output.student.kept], images.tolist(), context.plan.student_ratio))
        return output

    monkeypatch.setattr(ConsistencyStep, "__call__", recording)
    argv = tiny_options(shapes, tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    run_training(*parse_recipe(None, argv))
    history = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert len(seen) == 3
    for (kept, images, ratio), logged in zip(seen, history, strict=False):
        budget = round((1 - ratio) * 64)
        assert 0 < budget < 64 and sum(images) > 0
        assert kept == [budget * count for count in images]
        assert logged["kept_tokens"] == budget


def test_the_trainer_refuses_a_step_its_mode_does_not_run(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    curriculum = Curriculum("tcd", 4, 2, 0.5, tokens=target_token_schedule(0.5))
    with pytest.raises(ValueError, match="mode 'tcd' runs the consistency step, not the sft step"):
        EpicTrainer(
            model=build_tiny_llava(),
            args=args,
            curriculum=curriculum,
            step=SftStep(Compressor("dart")),
            compression_seed=0,
            template="vicuna_v1",
        )


def test_yaml_lists_become_lists(tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text("output_dir: out\nlabel_names: [labels, other]\n")
    assert parse_recipe(recipe)[3].label_names == ["labels", "other"]


def test_resume_refuses_a_folder_of_unfinished_checkpoints(shapes, tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    argv = tiny_options(shapes, tmp_path, max_steps=1, resume_from_checkpoint="last")
    with pytest.raises(ValueError, match="none was saved completely"):
        run_training(*parse_recipe(None, argv))


def test_sft_logs_the_micro_batch_mean_under_accumulation(shapes, tmp_path):
    argv = tiny_options(
        shapes, tmp_path, mode="sft", max_steps=1, gradient_accumulation_steps=2, save_strategy="steps", save_steps=1
    )
    run_training(*parse_recipe(None, argv))
    logged = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())["log_history"][0]
    assert logged["ce_loss"] == pytest.approx(logged["loss"], rel=0.15)
