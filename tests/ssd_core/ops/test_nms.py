"""grouped_nms against torchvision's batched_nms and a per-group nms loop."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms, nms

from ssd_core.ops.nms import grouped_nms


def random_boxes(count: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    corner = torch.rand(count, 2, generator=generator) * 0.8
    size = torch.rand(count, 2, generator=generator) * 0.3 + 0.02
    return torch.cat((corner, corner + size), dim=1).double() * scale


def per_group_loop(boxes, scores, groups, iou_threshold):
    kept = []
    for group in groups.unique().tolist():
        index = (groups == group).nonzero().flatten()
        kept.append(index[nms(boxes[index], scores[index], iou_threshold)])
    return torch.cat(kept).sort().values


@pytest.mark.parametrize(("count", "num_groups"), [(1, 1), (40, 3), (300, 1), (700, 90), (2500, 600), (3000, 7)])
def test_keeps_what_a_per_group_loop_and_batched_nms_keep(count, num_groups):
    # 300 in one group: a group above the per-call size gets a call alone; 2500 in 600: many calls
    generator = torch.Generator().manual_seed(count + num_groups)
    boxes, scores = random_boxes(count, generator), torch.rand(count, generator=generator).double()
    groups = torch.randint(0, num_groups, (count,), generator=generator) * 7  # sparse group ids
    got = grouped_nms(boxes, scores, groups, 0.45).sort().values
    assert torch.equal(got, per_group_loop(boxes, scores, groups, 0.45))
    assert torch.equal(got, batched_nms(boxes, scores, groups, 0.45).sort().values)


def test_groups_never_suppress_each_other_whatever_the_coordinates():
    # the same box in two groups, reaching further below 0 than above: both stay
    boxes = torch.tensor([[-500.0, -300.0, 10.0, 20.0]] * 2, dtype=torch.float64)
    got = grouped_nms(boxes, torch.tensor([0.9, 0.8], dtype=torch.float64), torch.tensor([3, 1]), 0.5)
    assert sorted(got.tolist()) == [0, 1]
    generator = torch.Generator().manual_seed(0)
    boxes = random_boxes(600, generator, scale=640.0) - 100.0
    scores, groups = torch.rand(600, generator=generator).double(), torch.randint(0, 40, (600,), generator=generator)
    assert torch.equal(grouped_nms(boxes, scores, groups, 0.3).sort().values, per_group_loop(boxes, scores, groups, 0.3))


def test_empty_input():
    got = grouped_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert got.shape == (0,) and got.dtype == torch.long
