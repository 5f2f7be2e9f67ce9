"""Reading the batch: prompt ends by the three rules, images split per row, and one-line errors on bad layouts."""

from __future__ import annotations

import pytest
import torch

from epic.compression.batch import last_true, prompt_ends, read_layout
from epic.compression.families import count_images
from epic.labels import IGNORE_INDEX

X = IGNORE_INDEX  # an unsupervised label


def test_prompt_ends_before_the_first_label_else_at_the_first_wanted_logit_else_at_the_last_real_token():
    valid = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]).bool()  # right- and left-padded
    labels = torch.tensor([[X, X, X, 7, 8, X], [X, X, X, X, X, X]])
    assert prompt_ends(valid, labels).tolist() == [3, 6]  # no label in row 1: its whole input is prompt
    wanted = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]]).bool()  # logit at t predicts token t + 1
    assert prompt_ends(valid, logits_mask=wanted).tolist() == [3, 6]
    assert prompt_ends(valid).tolist() == [5, 6]
    assert last_true(valid).tolist() == [4, 5]


def test_layout_splits_each_rows_images_and_finds_the_prompt_text():
    image_mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 1, 1, 0]]).bool()
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]]).bool()
    layout = read_layout(image_mask, valid, [2, 2, 2, 2], prompt_end=torch.tensor([6, 7]))
    assert layout.tokens_per_image == 2
    assert [[image.tolist() for image in row] for row in layout.images] == [[[1, 2], [3, 4]], [[2, 3], [5, 6]]]
    assert [text.tolist() for text in layout.text_positions] == [[0, 5], [0, 1, 4]]
    assert layout.prompt_last.tolist() == [5, 6]


@pytest.mark.parametrize(
    ("image_mask", "sizes", "prompt_end", "message"),
    [
        ([[0, 1, 1, 1, 0, 0]], [2, 2], [5], r"3 image tokens for 2 image\(s\) of \[2, 2\] tokens"),
        ([[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0]], [1, 2, 2], [5, 5], r"row 0 holds 2 image tokens, not whole images"),
        ([[0, 1, 1, 0, 0, 0]], [2], [2], "image tokens after its first supervised label"),
        ([[0, 1, 1, 0, 0, 0]], [2], [0], "row 0 has no prompt"),
    ],
)
def test_layout_refuses_what_does_not_add_up(image_mask, sizes, prompt_end, message):
    image_mask = torch.tensor(image_mask).bool()
    with pytest.raises(ValueError, match=message):
        read_layout(image_mask, torch.ones_like(image_mask), sizes, torch.tensor(prompt_end))


def test_layout_splits_images_of_different_sizes_in_order():
    image_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0]]).bool()
    layout = read_layout(image_mask, torch.ones_like(image_mask), [3, 2, 2], prompt_end=torch.tensor([7, 7]))
    assert [[image.tolist() for image in row] for row in layout.images] == [[[1, 2, 3], [4, 5]], [[0, 1]]]
    assert layout.image_sizes == [[3, 2], [2]]
    assert layout.tokens_per_image is None


def test_images_are_counted_from_pixel_values_and_refused_in_other_shapes():
    assert count_images({"pixel_values": torch.zeros(3, 3, 8, 8)}) == 3
    with pytest.raises(ValueError, match=r"one \[3, H, W\] tensor per image"):
        count_images({"pixel_values": torch.zeros(1, 2, 3, 8, 8)})
    with pytest.raises(ValueError, match="neither pixel_values nor mm_encoder_outputs"):
        count_images({})
