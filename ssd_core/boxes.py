"""Box format conversions, IoU and validation.

Formats used throughout the project:
  * point form:  (x1, y1, x2, y2), the corners;
  * center form: (cx, cy, w, h), as the priors are stored.
Normalised boxes live in [0, 1] image coordinates.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou as _box_iou

__all__ = ["batched_box_iou", "box_iou", "center_size", "invalid_box_mask", "point_form", "validate_boxes"]


def point_form(boxes: Tensor) -> Tensor:
    """Convert center-form boxes to point form.

    Args:
        boxes (Tensor[..., 4]): boxes in (cx, cy, w, h).

    Returns:
        Tensor[..., 4]: the same boxes in (x1, y1, x2, y2).
    """
    half = boxes[..., 2:] / 2
    return torch.cat((boxes[..., :2] - half, boxes[..., :2] + half), dim=-1)


def center_size(boxes: Tensor) -> Tensor:
    """Convert point-form boxes to center form.

    Args:
        boxes (Tensor[..., 4]): boxes in (x1, y1, x2, y2).

    Returns:
        Tensor[..., 4]: the same boxes in (cx, cy, w, h).
    """
    return torch.cat(((boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]), dim=-1)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise Jaccard overlap (IoU); `torchvision.ops.box_iou`.

    Args:
        boxes1 (Tensor[N, 4]): boxes in (x1, y1, x2, y2).
        boxes2 (Tensor[M, 4]): boxes in (x1, y1, x2, y2).

    Returns:
        Tensor[N, M]: IoU of every pair.
    """
    return _box_iou(boxes1, boxes2)


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every pair within each batch element.

    `torchvision.ops.box_iou` is 2-D only; this broadcasts the same arithmetic over a batch,
    e.g. ground truths against each image's own decoded predictions.

    Args:
        boxes1 (Tensor[B, N, 4]): boxes in (x1, y1, x2, y2).
        boxes2 (Tensor[B, M, 4]): boxes in (x1, y1, x2, y2).

    Returns:
        Tensor[B, N, M]: IoU of every pair in each batch element.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])  # [B, N]
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])  # [B, M]
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # [B, N, M, 2]
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])  # [B, N, M, 2]
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # [B, N, M]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union


def invalid_box_mask(boxes: Tensor) -> Tensor:
    """Which boxes are unusable: non-finite coordinates, zero or negative width or height.

    Args:
        boxes (Tensor[..., 4]): boxes in (x1, y1, x2, y2).

    Returns:
        Tensor[...] (bool): True where the box is invalid.
    """
    finite = torch.isfinite(boxes).all(dim=-1)
    positive = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return ~(finite & positive)


def validate_boxes(boxes: Tensor, name: str = "boxes") -> None:
    """Raise ValueError naming the first invalid box (non-finite, x2 <= x1 or y2 <= y1).

    Args:
        boxes (Tensor[..., 4]): boxes in (x1, y1, x2, y2).
        name: how the caller refers to the tensor, used in the message.
    """
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"{name} must have shape [..., 4], got {tuple(boxes.shape)}")
    bad = invalid_box_mask(boxes)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        where = "".join(f"[{i}]" for i in index)
        raise ValueError(
            f"{name}{where} = {boxes[index].tolist()} is invalid: coordinates must be finite "
            "with x2 > x1 and y2 > y1"
        )
