"""kd_loss against an independent computation, and the shift it must respect."""

from __future__ import annotations

import math

import pytest
import torch

from epic.distill import ce_rows, distilled_positions, kd_loss, kl_rows
from epic.labels import IGNORE_INDEX

X = IGNORE_INDEX  # an unsupervised label


def reference_kd(student, teacher, labels, temperature=1.0):
    """Position by position, with Python floats: KL(p_teacher || p_student) where labels[t+1] is supervised."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == IGNORE_INDEX:
                continue
            p = torch.softmax(teacher[b, t].double() / temperature, -1).tolist()
            q = torch.softmax(student[b, t].double() / temperature, -1).tolist()
            total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
            count += 1
    return total / count * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_matches_a_position_by_position_computation(temperature):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 7, 11, generator=generator)
    teacher = torch.randn(2, 7, 11, generator=generator)
    labels = torch.full((2, 7), IGNORE_INDEX)
    labels[0, 4:6] = 3
    labels[1, 2:7] = 5
    expected = reference_kd(student, teacher, labels, temperature)
    assert kd_loss(student, teacher, labels, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_the_logit_before_the_first_answer_token_is_distilled_and_the_one_after_the_last_is_not():
    labels = torch.tensor([[X, X, X, 7, 8, X, X]])  # answer at positions 3 and 4
    assert distilled_positions(labels).nonzero()[:, 1].tolist() == [2, 3]
    student = torch.zeros(1, 7, 5)
    teacher = torch.zeros(1, 7, 5)
    teacher[0, 2, 0] = 5.0  # differs only where the first answer token is predicted
    assert kd_loss(student, teacher, labels) > 0.1
    teacher = torch.zeros(1, 7, 5)
    teacher[0, 4, 0] = 5.0  # differs only at the last answer token (predicts past the answer)
    assert kd_loss(student, teacher, labels) == 0.0


def test_identical_logits_give_zero_and_fp32_is_used():
    logits = torch.randn(1, 5, 9).to(torch.bfloat16)
    labels = torch.tensor([[X, 1, 2, 3, X]])
    loss = kd_loss(logits, logits.clone(), labels)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(0.0, abs=1e-6)


def test_rows_versions_normalise_by_items():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    targets = torch.tensor([0, 1, 2, 3])
    assert kl_rows(student, teacher, num_items=8).item() == pytest.approx(kl_rows(student, teacher).item() / 2)
    expected = torch.nn.functional.cross_entropy(student, targets)
    assert ce_rows(student, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    assert ce_rows(student, targets, torch.tensor(8)).item() == pytest.approx(expected.item() / 2, rel=1e-6)
    with pytest.raises(ValueError, match="differ"):
        kl_rows(student, teacher[:3])
