"""Distillation losses as pure functions (SPEC section 2).

With the transformers shift, the logit at position t predicts label t+1, so position t is distilled iff
`labels[t + 1] != IGNORE_INDEX`: the logit that predicts the first answer token is distilled (the released code tests
`labels[t]` and misses it), the one after the last answer token is not. KL is computed in fp32 at those positions
only, never over the full [B, L, V] tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epic.labels import IGNORE_INDEX


def distilled_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: True at t where `labels[:, t + 1]` is supervised (False in the last column)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def _normalise(total: torch.Tensor, rows: int, num_items: int | torch.Tensor | None) -> torch.Tensor:
    """`total` / `num_items` (the Trainer's token count across gradient accumulation), or / rows when None."""
    if num_items is None:
        return total / max(rows, 1)
    if torch.is_tensor(num_items):
        return total / num_items.to(total.device).clamp(min=1)
    return total / max(num_items, 1)


def kl_rows(
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    temperature: float = 1.0,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of [N, V] logits at temperature T, times T^2, in fp32: the mean over rows, or the
    sum divided by `num_items`."""
    kl = kl_per_row(student_rows, teacher_rows, temperature)
    return _normalise(kl.sum(), kl.shape[0], num_items) * temperature**2


def kl_per_row(student_rows: torch.Tensor, teacher_rows: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N] KL(teacher || student) of each pair of [N, V] logit rows at temperature T, in fp32 (not times T^2)."""
    if student_rows.shape != teacher_rows.shape:
        raise ValueError(
            f"student rows {tuple(student_rows.shape)} and teacher rows {tuple(teacher_rows.shape)} differ"
        )
    student_log = F.log_softmax(student_rows.float() / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_rows.float() / temperature, dim=-1)
    return (teacher_log.exp() * (teacher_log - student_log)).sum(dim=-1)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) averaged over the positions whose next label is supervised.

    Args:
        student_logits, teacher_logits: [B, L, V], aligned position by position.
        labels: [B, L] in the transformers convention (not shifted; IGNORE_INDEX ignored).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:2] != labels.shape:
        raise ValueError(
            f"shapes disagree: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    positions = distilled_positions(labels)
    return kl_rows(student_logits[positions], teacher_logits[positions], temperature)


def ce_rows(rows: torch.Tensor, targets: torch.Tensor, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of [N, V] logits against [N] targets in fp32: summed, divided by `num_items` (the Trainer's
    token count across gradient accumulation) or averaged when it is None."""
    return _normalise(F.cross_entropy(rows.float(), targets, reduction="sum"), rows.shape[0], num_items)
