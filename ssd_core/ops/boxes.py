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
    """IoU of every pair within each batch element (batch dimensions broadcast).

    `torchvision.ops.box_iou` is 2-D only and builds [N, M, 2] corner tensors; this works on one
    coordinate at a time ([..., N, M] each), which vectorises along M and is several times faster
    for the loss's truths-against-8732-priors case.

    Args:
        boxes1 (Tensor[B, N, 4]): boxes in (x1, y1, x2, y2).
        boxes2 (Tensor[B, M, 4]): boxes in (x1, y1, x2, y2).

    Returns:
        Tensor[B, N, M]: IoU of every pair in each batch element.
    """
    # contiguous coordinate planes: strided columns make every op below several times slower
    x1a, y1a, x2a, y2a = (c[..., :, None] for c in boxes1.movedim(-1, 0).contiguous())  # [B, N, 1] each
    x1b, y1b, x2b, y2b = (c[..., None, :] for c in boxes2.movedim(-1, 0).contiguous())  # [B, 1, M] each
    # in place where possible: each fresh [B, N, M] buffer costs a pass of page faults
    width = torch.minimum(x2a, x2b).sub_(torch.maximum(x1a, x1b)).clamp_(min=0)  # [B, N, M]
    height = torch.minimum(y2a, y2b).sub_(torch.maximum(y1a, y1b)).clamp_(min=0)
    inter = width.mul_(height)
    area_a = (x2a - x1a) * (y2a - y1a)  # [B, N, 1]
    area_b = (x2b - x1b) * (y2b - y1b)  # [B, 1, M]
    return inter.div_((area_a + area_b).sub_(inter))


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
