"""LLaVA-KD losses (SPEC section 3) as pure functions: MDist's visual part and RDist, per image and batched.

A frozen larger teacher MLLM teaches a small student with the same tokenizer; both see identical input ids. The
total loss is `CE + a * L_res + b * L_vis + c * L_rel`:

- L_res, MDist's response part: KL(teacher || student) at the response positions with the transformers shift, T = 1
  (`epic.distill.kd_loss` for [B, L, V] logits, `kl_rows` for rows).
- L_vis, MDist's visual part: the same KL at every visual-token position, no shift (the next-token distributions
  the LM head produces there), averaged over each image's positions.
- L_rel, RDist: per image, Z = its visual-position logits [n, V], R = Z Z^T [n, n]; 1 - cos(vec R_s, vec R_t).

Both per-image losses are summed over the images and divided by `num_images` (the image count of the whole
accumulated batch, as `num_items` is for tokens) or averaged over the images when it is None. Everything is computed
in fp32, on the logits' shared vocabulary columns only (`shared_columns`): padded LM heads differ in width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epic.distill.losses import kl_per_row


def shared_columns(student: torch.Tensor, teacher: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logit tensors cut to the first `vocab_size` columns (`len(tokenizer)`), the vocabulary they share."""
    narrowest = min(student.shape[-1], teacher.shape[-1])
    if vocab_size > narrowest:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but the logits have only {student.shape[-1]} (student) and "
            f"{teacher.shape[-1]} (teacher) columns"
        )
    return student[..., :vocab_size], teacher[..., :vocab_size]


def _images(rows: int, tokens_per_image: int) -> int:
    """How many images of `tokens_per_image` positions `rows` visual rows hold (they must be whole images)."""
    if tokens_per_image <= 0 or rows % tokens_per_image:
        raise ValueError(f"{rows} visual rows are not whole images of {tokens_per_image} tokens")
    return rows // tokens_per_image


def _over_images(per_image: torch.Tensor, num_images: int | torch.Tensor | None) -> torch.Tensor:
    """Sum of [I] per-image losses / `num_images`, or their mean when it is None (0 without images)."""
    if num_images is None:
        return per_image.sum() / max(per_image.shape[0], 1)
    if torch.is_tensor(num_images):
        return per_image.sum() / num_images.to(per_image.device).clamp(min=1)
    return per_image.sum() / max(num_images, 1)


def visual_kd_rows(
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    tokens_per_image: int,
    num_images: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """MDist's visual part: KL(teacher || student) at each visual position (T = 1), averaged over each image's
    positions, summed over images / `num_images` (mean over images when None).

    Args:
        student_rows, teacher_rows: [I * n, V] logits at the visual positions of I images, image after image.
        tokens_per_image: n, the positions of one image (its kept tokens when the student is compressed).
    """
    kl = kl_per_row(student_rows, teacher_rows)  # [I * n]
    per_image = kl.view(_images(kl.shape[0], tokens_per_image), tokens_per_image).mean(dim=1)
    return _over_images(per_image, num_images)


def relation_rows(
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    tokens_per_image: int,
    num_images: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """RDist: per image, R = Z Z^T of its [n, V] visual logits Z; loss 1 - cos(vec R_s, vec R_t), summed over
    images / `num_images` (mean over images when None). Depends on logits only, not on either model's width.

    Args:
        student_rows, teacher_rows: [I * n, V] logits at the visual positions of I images, image after image.
        tokens_per_image: n, the positions of one image.
    """
    if student_rows.shape != teacher_rows.shape:
        raise ValueError(
            f"student rows {tuple(student_rows.shape)} and teacher rows {tuple(teacher_rows.shape)} differ"
        )
    shape = (_images(student_rows.shape[0], tokens_per_image), tokens_per_image, student_rows.shape[-1])
    student, teacher = student_rows.float().view(shape), teacher_rows.float().view(shape)
    with torch.autocast(student.device.type, enabled=False):  # autocast would run the products in half precision
        student_relation = torch.bmm(student, student.transpose(1, 2)).flatten(1)  # [I, n * n]
        teacher_relation = torch.bmm(teacher, teacher.transpose(1, 2)).flatten(1)
        cosine = F.cosine_similarity(student_relation, teacher_relation, dim=1)
    return _over_images(1.0 - cosine, num_images)


def image_positions(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int) -> torch.Tensor:
    """[B, L] bool: the visual-token positions; checked to hold whole images of `tokens_per_image` in every row."""
    mask = input_ids == image_token_id
    counts = mask.sum(dim=1)
    if bool((counts % tokens_per_image).any()):
        raise ValueError(f"image-token counts per row {counts.tolist()} are not multiples of {tokens_per_image}")
    return mask


def visual_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    tokens_per_image: int,
) -> torch.Tensor:
    """MDist's visual part for [B, L, V] logits aligned position by position: the mean over every image of every
    row (rows without an image add nothing; 0 when the batch has no image)."""
    mask = image_positions(input_ids, image_token_id, tokens_per_image)
    return visual_kd_rows(student_logits[mask], teacher_logits[mask], tokens_per_image)


def relation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    tokens_per_image: int,
) -> torch.Tensor:
    """RDist for [B, L, V] logits aligned position by position: the mean over every image of every row."""
    mask = image_positions(input_ids, image_token_id, tokens_per_image)
    return relation_rows(student_logits[mask], teacher_logits[mask], tokens_per_image)
