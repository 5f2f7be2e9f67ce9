"""LLaVA-KD losses against independent computations: per image, every row, padding, several images, no image."""

from __future__ import annotations

import math

import pytest
import torch

from epic.distill import (
    image_positions,
    kd_loss,
    relation_loss,
    relation_rows,
    shared_columns,
    visual_kd_loss,
    visual_kd_rows,
)
from epic.labels import IGNORE_INDEX

IMAGE = 9  # the image token id of these batches
N = 3  # visual tokens per image


def batch_ids() -> torch.Tensor:
    """Row 0: one image, right padding; row 1: two images; row 2: no image; row 3: one image, left padding."""
    pad, text = 0, 5
    rows = [
        [1, text, IMAGE, IMAGE, IMAGE, text, text, pad, pad],
        [1, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, text, text],
        [1, text, text, text, text, text, text, text, pad],
        [pad, pad, 1, IMAGE, IMAGE, IMAGE, text, text, text],
    ]
    return torch.tensor(rows)


def logits(seed: int, vocab: int = 7) -> torch.Tensor:
    return torch.randn(4, 9, vocab, generator=torch.Generator().manual_seed(seed))


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) of two logit vectors, with Python floats."""
    p = torch.softmax(p_logits.double(), -1).tolist()
    q = torch.softmax(q_logits.double(), -1).tolist()
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def images_of(input_ids: torch.Tensor) -> list[tuple[int, list[int]]]:
    """(row, positions) of every image, found token by token."""
    found = []
    for row in range(input_ids.shape[0]):
        positions = [t for t in range(input_ids.shape[1]) if int(input_ids[row, t]) == IMAGE]
        found += [(row, positions[i : i + N]) for i in range(0, len(positions), N)]
    return found


def reference_visual(student, teacher, input_ids) -> float:
    per_image = [
        sum(kl(teacher[row, t], student[row, t]) for t in positions) / len(positions)
        for row, positions in images_of(input_ids)
    ]
    return sum(per_image) / len(per_image)


def reference_relation(student, teacher, input_ids) -> float:
    """Per image: R[i][j] = sum_v z_i[v] z_j[v] as Python sums, then 1 - cosine of the flattened matrices."""

    def relation(z, row, positions):
        rows = [z[row, t].double().tolist() for t in positions]
        return [sum(a * b for a, b in zip(ri, rj, strict=True)) for ri in rows for rj in rows]

    losses = []
    for row, positions in images_of(input_ids):
        rs, rt = relation(student, row, positions), relation(teacher, row, positions)
        dot = sum(a * b for a, b in zip(rs, rt, strict=True))
        losses.append(1 - dot / (math.sqrt(sum(a * a for a in rs)) * math.sqrt(sum(b * b for b in rt))))
    return sum(losses) / len(losses)


def test_visual_part_matches_a_per_image_computation():
    input_ids = batch_ids()
    student, teacher = logits(0), logits(1)
    expected = reference_visual(student, teacher, input_ids)
    assert len(images_of(input_ids)) == 4
    assert visual_kd_loss(student, teacher, input_ids, IMAGE, N).item() == pytest.approx(expected, rel=1e-5)


def test_relation_matches_a_per_image_computation():
    input_ids = batch_ids()
    student, teacher = logits(2), logits(3)
    expected = reference_relation(student, teacher, input_ids)
    assert relation_loss(student, teacher, input_ids, IMAGE, N).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("loss", [visual_kd_loss, relation_loss])
def test_every_image_of_every_row_counts_and_text_does_not(loss):
    input_ids = batch_ids()
    student = logits(4)
    assert loss(student, student.clone(), input_ids, IMAGE, N).item() == pytest.approx(0.0, abs=1e-6)
    teacher = student.clone()
    teacher[1, 4:7] = torch.randn(3, 7)  # row 1's second image only
    assert loss(student, teacher, input_ids, IMAGE, N).item() > 1e-3
    teacher = student.clone()
    teacher[3, 5] += torch.randn(7)  # row 3 (left padded): the last image token
    assert loss(student, teacher, input_ids, IMAGE, N).item() > 1e-4
    teacher = student.clone()
    teacher[2] = torch.randn(9, 7)  # the row without an image, and text and padding elsewhere
    teacher[0, [0, 1, 5, 6, 7, 8]] = torch.randn(6, 7)
    assert loss(student, teacher, input_ids, IMAGE, N).item() == pytest.approx(0.0, abs=1e-6)


def test_relation_is_zero_for_proportional_logits_and_ignores_how_they_were_made():
    """RDist compares n x n relation matrices of logits: a scaled copy costs nothing, and a student of another
    hidden size with the same logits gets the same loss."""
    generator = torch.Generator().manual_seed(5)
    teacher = torch.randn(2 * N, 11, generator=generator)
    assert relation_rows(3.0 * teacher, teacher, N).item() == pytest.approx(0.0, abs=1e-6)
    hidden, head = torch.randn(2 * N, 4, generator=generator), torch.randn(11, 4, generator=generator)
    narrow = hidden @ head.T  # a student of hidden size 4
    wide_hidden = torch.cat([hidden, torch.randn(2 * N, 12, generator=generator)], dim=1)
    wide_head = torch.cat([head, torch.zeros(11, 12)], dim=1)
    wide = wide_hidden @ wide_head.T  # hidden size 16, the same logits
    assert relation_rows(narrow, teacher, N).item() == pytest.approx(relation_rows(wide, teacher, N).item(), rel=1e-5)
    assert relation_rows(narrow, teacher, N).item() > 1e-3


def test_rows_forms_normalise_by_the_image_count_and_work_in_fp32():
    generator = torch.Generator().manual_seed(6)
    student = torch.randn(2 * N, 8, generator=generator).to(torch.bfloat16).requires_grad_()
    teacher = torch.randn(2 * N, 8, generator=generator).to(torch.bfloat16)
    for loss in (visual_kd_rows, relation_rows):
        mean = loss(student, teacher, N)
        assert mean.dtype == torch.float32
        assert loss(student, teacher, N, num_images=4).item() == pytest.approx(mean.item() / 2, rel=1e-5)
        assert loss(student, teacher, N, num_images=torch.tensor(4)).item() == pytest.approx(mean.item() / 2, rel=1e-5)
        mean.backward()
        assert student.grad is not None and student.grad.abs().sum() > 0
        student.grad = None
    empty = torch.zeros(0, 8)
    assert visual_kd_rows(empty, empty, N).item() == 0.0 and relation_rows(empty, empty, N).item() == 0.0
    with pytest.raises(ValueError, match="not whole images"):
        visual_kd_rows(student[:4], teacher[:4], N)


def test_relation_stays_fp32_under_autocast():
    generator = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(N, 50, generator=generator) * 30, torch.randn(N, 50, generator=generator) * 30
    expected = relation_rows(student, teacher, N)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert relation_rows(student, teacher, N).item() == pytest.approx(expected.item(), rel=1e-6)


def test_response_part_is_the_shifted_kd_loss():
    """MDist's response part: KL at t where labels[t + 1] is supervised (the image positions are not)."""
    input_ids = batch_ids()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 5:7] = 5
    labels[3, 7:9] = 5
    student, teacher = logits(8), logits(9)
    positions = [(0, 4), (0, 5), (3, 6), (3, 7)]
    expected = sum(kl(teacher[b, t], student[b, t]) for b, t in positions) / len(positions)
    assert kd_loss(student, teacher, labels).item() == pytest.approx(expected, rel=1e-5)


def test_shared_columns_cut_the_padded_heads():
    student, teacher = torch.randn(3, 12), torch.randn(3, 10)
    cut_student, cut_teacher = shared_columns(student, teacher, 8)
    assert cut_student.shape == cut_teacher.shape == (3, 8)
    assert torch.equal(cut_student, student[:, :8])
    with pytest.raises(ValueError, match="tokenizer has 11 tokens"):
        shared_columns(student, teacher, 11)


def test_image_positions_refuse_partial_images():
    input_ids = batch_ids()
    assert image_positions(input_ids, IMAGE, N).sum(dim=1).tolist() == [3, 6, 0, 3]
    with pytest.raises(ValueError, match="not multiples of 4"):
        image_positions(input_ids, IMAGE, 4)
