"""Box formats, IoU and validation."""

from __future__ import annotations

import pytest
import torch

from ssd_core.ops.boxes import (
    batched_box_iou,
    box_iou,
    center_size,
    invalid_box_mask,
    point_form,
    validate_boxes,
)
from tests.ssd_core.random_data import random_boxes


def test_point_form_and_center_size_by_hand_and_inverse():
    center = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    torch.testing.assert_close(point_form(center), torch.tensor([[0.4, 0.1, 0.6, 0.7]]))
    torch.testing.assert_close(center_size(point_form(center)), center)


def test_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 0.4, 0.4]])
    b = torch.tensor([[0.0, 0.0, 0.4, 0.2], [0.2, 0.2, 0.6, 0.6], [0.5, 0.5, 1.0, 1.0]])
    # 0.08 / 0.16; 0.04 / (0.16 + 0.16 - 0.04); disjoint
    expected = torch.tensor([[0.5, 0.04 / 0.28, 0.0]])
    torch.testing.assert_close(box_iou(a, b), expected)
    torch.testing.assert_close(batched_box_iou(a[None], b[None]), expected[None])


def test_batched_iou_equals_torchvision_per_element():
    generator = torch.Generator().manual_seed(0)
    a = torch.stack([random_boxes(5, generator) for _ in range(3)])
    b = torch.stack([random_boxes(7, generator) for _ in range(3)])
    expected = torch.stack([box_iou(a[i], b[i]) for i in range(3)])
    torch.testing.assert_close(batched_box_iou(a, b), expected)
    # broadcasting a shared second set
    torch.testing.assert_close(batched_box_iou(a, b[:1]), torch.stack([box_iou(a[i], b[0]) for i in range(3)]))


def test_invalid_box_mask_and_validate():
    boxes = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.2, 0.1, 0.2, 0.3], [0.1, 0.3, 0.2, 0.1],
                          [0.0, float("nan"), 0.1, 0.1]])
    assert invalid_box_mask(boxes).tolist() == [False, True, True, True]
    validate_boxes(boxes[:1])
    with pytest.raises(ValueError, match=r"gt\[1\]"):
        validate_boxes(boxes, "gt")
