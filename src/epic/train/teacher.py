"""LLaVA-KD's teacher: its dtype, the checks that it fits its student (read from configs and processors before its
weights load), and loading it frozen.

LLaVA-KD compares the two models' distributions token by token and feeds the teacher the student's pixel values, so
both need one tokenizer, the same image token, visual-token count, image size and pixel normalisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from epic.compat import whole_parameters
from epic.data.dataset import image_token_count
from epic.models.loading import load_llava_model

TEACHER_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it, else fp32; or one of `TEACHER_DTYPES` by name."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in TEACHER_DTYPES:
        raise ValueError(f"unknown teacher_dtype {name!r}; choose auto or one of {sorted(TEACHER_DTYPES)}")
    return TEACHER_DTYPES[name]


def check_same_tokenizer(student: Any, teacher: Any) -> None:
    """Refuse two tokenizers whose vocabularies (token -> id, added tokens included) differ, naming the first id
    where they do: LLaVA-KD compares the two models' distributions token by token."""
    student_tokens = {index: token for token, index in student.get_vocab().items()}
    teacher_tokens = {index: token for token, index in teacher.get_vocab().items()}
    for index in sorted(student_tokens.keys() | teacher_tokens.keys()):
        if student_tokens.get(index) != teacher_tokens.get(index):
            raise ValueError(
                f"the teacher's tokenizer differs from the student's (LLaVA-KD needs one vocabulary): first at id "
                f"{index}, student {student_tokens.get(index)!r}, teacher {teacher_tokens.get(index)!r} "
                f"({len(student_tokens)} and {len(teacher_tokens)} tokens)"
            )


def check_visual_tokens(student: int, teacher: int) -> None:
    """Refuse a teacher that turns an image into another number of visual tokens than the student."""
    if student != teacher:
        raise ValueError(
            f"the teacher sees {teacher} visual tokens per image and the student {student}: LLaVA-KD needs the same "
            "vision tower and feature strategy in both (729 for SigLIP-so400m-384 with the 'full' strategy)"
        )


PIXEL_SETTINGS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")


def _pixel_setting(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def check_teacher(student: nn.Module, student_processor: Any, teacher_config: Any, teacher_processor: Any) -> None:
    """Everything the teacher must share with the student, read before the teacher's weights are loaded: the
    tokenizer, the image token, the visual-token count, the image size and the pixel normalisation (it is fed the
    student's pixel values)."""
    check_same_tokenizer(student_processor.tokenizer, teacher_processor.tokenizer)
    for name in PIXEL_SETTINGS:
        ours = _pixel_setting(getattr(student_processor.image_processor, name, None))
        theirs = _pixel_setting(getattr(teacher_processor.image_processor, name, None))
        if ours != theirs:
            raise ValueError(
                f"the teacher's image processor has {name}={theirs}, the student's {ours}: the teacher is fed the "
                "student's pixel values, so both must normalise images alike (the same vision tower)"
            )
    if student.config.image_token_id != teacher_config.image_token_id:
        raise ValueError(
            f"the teacher's image token id is {teacher_config.image_token_id}, the student's "
            f"{student.config.image_token_id}"
        )
    check_visual_tokens(image_token_count(student_processor), image_token_count(teacher_processor))
    student_size = student.config.vision_config.image_size
    if student_size != teacher_config.vision_config.image_size:
        raise ValueError(
            f"the teacher's vision tower reads {teacher_config.vision_config.image_size} px images, the student's "
            f"{student_size} px: the teacher is fed the student's pixel values"
        )
    vocab = len(student_processor.tokenizer)
    widths = (student.config.text_config.vocab_size, teacher_config.text_config.vocab_size)
    if vocab > min(widths):
        raise ValueError(f"the tokenizer has {vocab} tokens, more than the LM heads' {widths} (student, teacher)")


def load_teacher(checkpoint: str, dtype_name: str, attn_implementation: str, device: torch.device) -> nn.Module:
    """The teacher: loaded once, whole (never partitioned by ZeRO-3), frozen, in eval mode, on `device`."""
    with whole_parameters():
        teacher = load_llava_model(  # safetensors only
            checkpoint, dtype=teacher_dtype(dtype_name, device), attn_implementation=attn_implementation
        )
    return teacher.to(device).eval().requires_grad_(False)
