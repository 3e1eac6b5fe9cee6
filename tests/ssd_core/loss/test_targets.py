"""pad_targets: layout, padding, the difficult column, and validation messages."""

from __future__ import annotations

import math

import pytest
import torch

from ssd_core.loss.targets import pad_targets


def test_list_is_padded_with_negative_labels_and_a_difficult_column():
    targets = [torch.tensor([[0.1, 0.1, 0.4, 0.5, 2.0]]), torch.zeros(0, 5),
               torch.tensor([[0.0, 0.2, 0.3, 0.9, 0.0, 1.0], [0.5, 0.5, 0.6, 0.7, 1.0, 0.0]])]
    padded = pad_targets(targets, num_classes=4)
    assert padded.shape == (3, 2, 6)
    assert padded[0, 0].tolist() == pytest.approx([0.1, 0.1, 0.4, 0.5, 2.0, 0.0])
    assert padded[0, 1].tolist() == [0, 0, 0, 0, -1, 0]
    assert padded[1, :, 4].tolist() == [-1, -1]
    assert padded[2, :, 5].tolist() == [1, 0]


def test_padded_tensor_input_keeps_rows_and_normalises_padding():
    tensor = torch.tensor([[[0.1, 0.1, 0.2, 0.2, 0.0], [math.nan, 5.0, 1.0, 1.0, -1.0]]])
    padded = pad_targets(tensor, num_classes=2)
    assert padded.shape == (1, 2, 6)
    assert padded[0, 1].tolist() == [0, 0, 0, 0, -1, 0]  # garbage in a padding row is ignored


def test_all_empty_batch_gets_one_padding_row():
    padded = pad_targets([torch.zeros(0, 5), torch.empty(0)])
    assert padded.shape == (2, 1, 6) and (padded[..., 4] < 0).all()


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([0.5, 0.1, 0.5, 0.4], r"targets\[1\]\[1\]: box .* has x2 <= x1"),  # zero width
        ([0.1, 0.4, 0.3, 0.4], r"targets\[1\]\[1\]: box .* has y2 <= y1"),  # zero height
        ([0.6, 0.1, 0.2, 0.4], r"targets\[1\]\[1\]: box .* has x2 <= x1"),  # inverted
        ([0.1, math.nan, 0.3, 0.4], r"targets\[1\]\[1\]: box .* non-finite"),
        ([0.1, 0.1, math.inf, 0.4], r"targets\[1\]\[1\]: box .* non-finite"),
    ],
)
def test_invalid_boxes_name_image_and_box(box, message):
    good = [0.1, 0.1, 0.3, 0.3, 0.0]
    targets = [torch.tensor([good]), torch.tensor([good, [*box, 0.0]])]
    with pytest.raises(ValueError, match=message):
        pad_targets(targets, num_classes=3)


@pytest.mark.parametrize("label", [2.0, 7.0, 0.5, math.nan])
def test_labels_outside_the_classes_raise(label):
    with pytest.raises(ValueError, match=r"targets\[0\]\[0\]: label"):
        pad_targets([torch.tensor([[0.1, 0.1, 0.3, 0.3, label]])], num_classes=3)  # labels 0..1 allowed


def test_negative_label_in_a_list_raises():
    with pytest.raises(ValueError, match=r"targets\[1\]\[0\]: label -1.0 is negative"):
        pad_targets([torch.zeros(0, 5), torch.tensor([[0.1, 0.1, 0.3, 0.3, -1.0]])])


def test_bad_layout_names_shape():
    with pytest.raises(ValueError, match=r"targets\[0\] must have shape \[n, 5\]"):
        pad_targets([torch.zeros(2, 4)])
    with pytest.raises(ValueError, match=r"\[B, M, 5\|6\]"):
        pad_targets(torch.zeros(2, 3, 7))
