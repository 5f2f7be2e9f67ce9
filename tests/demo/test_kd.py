"""`epic demo --kd`: the two arms' stages and the student that shares the teacher's tokenizer and vision tower."""

from __future__ import annotations

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from epic.data.shapes import vocabulary_texts
from epic.demo import demo_config
from epic.demo.config import KD_ARMS
from epic.demo.kd import stages, student_init
from epic.models.factory import build_tiny_llava_with_processor, save_llava
from epic.train.teacher import check_teacher


def test_both_arms_train_the_same_steps_and_only_llava_kd_sees_the_teacher():
    config = demo_config(kd_pt_steps=3, kd_sft_steps=7, kd_dft_steps=5)
    runs = [stage for round_ in stages(config) for stage in round_]
    assert {arm: sum(s.steps for s in runs if s.arm == arm) for arm in KD_ARMS} == {"pt-sft": 15, "dpt-sft-dft": 15}
    assert [(s.name, s.mode, s.teacher) for s in runs if s.arm == "dpt-sft-dft"] == [
        ("dpt", "kd-pretrain", True),
        ("sft", "sft", False),
        ("dft", "kd-finetune", True),
    ]
    pt = [s for s in runs if s.arm == "pt-sft"]
    assert [s.mode for s in pt] == ["sft"] * 3 and pt[0].freeze_language_model and not any(s.teacher for s in pt)
    for first, second in stages(config):  # each round: the same steps, rate and schedule in both arms
        assert {(run.steps, run.learning_rate, run.schedule) for run in (first, second)} == {
            (first.steps, first.learning_rate, first.schedule)
        }


def test_student_is_smaller_and_shares_the_teachers_tokenizer_and_tower(tmp_path):
    config = demo_config(quick=True)
    teacher, processor = build_tiny_llava_with_processor(vocabulary_texts(config.synth()), config.spec(), seed=5)
    save_llava(teacher, processor, tmp_path / "teacher", config.template)
    folder = student_init(config, tmp_path / "teacher", tmp_path / "student")
    student = LlavaForConditionalGeneration.from_pretrained(folder)
    assert student.config.text_config.hidden_size == config.kd_student_hidden < config.hidden_size
    ours, theirs = student.model.vision_tower.state_dict(), teacher.model.vision_tower.state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    check_teacher(student, AutoProcessor.from_pretrained(folder), teacher.config, processor)
