"""Non-maximum suppression within groups (per image and class) in few `torchvision.ops.nms` calls."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

__all__ = ["grouped_nms"]

# boxes per `nms` call; groups are packed into calls up to this many boxes (a larger group gets a call alone).
# A call's cost grows with its boxes squared, and each call has a fixed cost: of 256, 512, 1024 and 2048, 256
# was the fastest on ssd-small's detections of many groups (1 thread).
_BOXES_PER_CALL = 256


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """The boxes that NMS keeps within each group: `torchvision.ops.batched_nms`'s result, faster for many groups.

    `batched_nms` runs one `nms` over all boxes, each group's moved apart by an offset, up to 1000 boxes on the
    CPU, and above that one `nms` per group, each after a scan of all N group ids. With the many small groups
    of a batch's detections (images x classes) both cost: ssd-small, 81 classes, batch 8, 1273 boxes in 547
    groups: 27-49 ms. Here the boxes are sorted by group and consecutive groups share a call of at most
    `_BOXES_PER_CALL` boxes, offset apart as `batched_nms` does it: 0.8-1.5 ms for that case. The offsets grow
    with the group ids: pass float64 boxes when there are hundreds of groups. On a GPU this is `batched_nms`
    (one kernel up to 5000 boxes; not measured here).

    Args:
        boxes (Tensor[N, 4]): in (x1, y1, x2, y2).
        scores (Tensor[N]).
        groups (Tensor[N] long): the group of each box; boxes of different groups never suppress each other.
        iou_threshold: a box is suppressed by a higher-scored one of its group with IoU above this.

    Returns:
        Tensor[K] long: indices of the kept boxes, in no particular order.
    """
    if boxes.device.type != "cpu":  # the measured case is the CPU's; on a GPU batched_nms stays one kernel longer
        return batched_nms(boxes, scores, groups, iou_threshold)
    if len(boxes) == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    step = boxes.max() - boxes.min() + 1  # groups this far apart cannot overlap
    if len(boxes) <= _BOXES_PER_CALL:  # one call without the sorting
        return nms(boxes + (groups.to(boxes) * step)[:, None], scores, iou_threshold)
    order = groups.argsort(stable=True)  # [N] boxes by group
    rank = torch.unique_consecutive(groups[order], return_inverse=True)[1]  # [N] dense group index, sorted
    bounds, start, size = [], 0, 0
    for count in torch.bincount(rank).tolist():
        if size and size + count > _BOXES_PER_CALL:
            bounds.append((start, start + size))
            start, size = start + size, 0
        size += count
    bounds.append((start, start + size))
    begins, ends = (torch.tensor(column, device=boxes.device) for column in zip(*bounds, strict=True))  # [calls]
    first = rank[begins].repeat_interleave(ends - begins)  # [N] the first group of each box's call
    shifted = boxes[order] + ((rank - first).to(boxes) * step)[:, None]  # [N, 4] by group, groups of a call apart
    sorted_scores = scores[order]  # [N]
    kept = [nms(shifted[begin:end], sorted_scores[begin:end], iou_threshold) + begin for begin, end in bounds]
    return order[torch.cat(kept)]
