"""The loss's compiled CPU loops against torch's ops and plain per-element loops."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from ssd_core.loss import matching
from ssd_core.loss.loss_kernels import best_truth_of_priors, hardest_negatives, kernels_apply, truth_prior_iou
from ssd_core.loss.targets import pad_targets
from ssd_core.ops.boxes import point_form
from tests.ssd_core.random_data import random_boxes, small_priors


def padded_truths(seed: int, batch: int = 5, max_truths: int = 6, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        n = 0 if b == 1 else int(torch.randint(1, max_truths + 1, (1,), generator=generator))  # image 1: none
        rows.append(torch.cat((random_boxes(n, generator), torch.zeros(n, 1)), dim=1))
    padded = pad_targets(rows, dtype=dtype)
    return padded[..., :4], padded[..., 4] >= 0


def torch_pairwise_iou(truths, valid, boxes, monkeypatch):
    """`pairwise_iou` by torch's element-wise ops (its path off the CPU)."""
    with monkeypatch.context() as patch:
        patch.setattr(matching, "kernels_apply", lambda *tensors, finite=False: False)
        return matching.pairwise_iou(truths, valid, boxes)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_image", [False, True])
def test_iou_is_bitwise_torchs_and_equals_box_iou_per_image(seed, dtype, per_image, monkeypatch):
    truths, valid = padded_truths(seed, dtype=dtype)
    priors = point_form(small_priors()).to(dtype)  # [P, 4]
    generator = torch.Generator().manual_seed(100 + seed)
    boxes = torch.stack([random_boxes(len(priors), generator).to(dtype) for _ in range(len(truths))]) if per_image \
        else priors
    assert kernels_apply(truths, boxes, finite=True)
    iou = truth_prior_iou(truths, valid, boxes)
    assert iou.dtype == dtype and iou.shape == (*valid.shape, len(priors))
    assert torch.equal(iou, torch_pairwise_iou(truths, valid, boxes, monkeypatch))
    for b in range(len(truths)):
        image_boxes = boxes[b] if per_image else boxes
        for m in range(valid.shape[1]):
            if valid[b, m]:
                torch.testing.assert_close(iou[b, m], box_iou(truths[b, m][None], image_boxes)[0])
            else:
                assert (iou[b, m] == -1).all()


def test_pairwise_iou_takes_torchs_path_for_non_finite_boxes(monkeypatch):
    truths, valid = padded_truths(0)
    boxes = point_form(small_priors())
    boxes[3, 2] = math.inf
    assert not kernels_apply(truths, boxes, finite=True)
    assert kernels_apply(truths, boxes)  # only the IoU loop needs finite boxes
    iou = matching.pairwise_iou(truths, valid, boxes)
    assert torch.equal(iou, torch_pairwise_iou(truths, valid, boxes, monkeypatch))


def test_kernels_apply_to_cpu_float32_and_float64_of_one_dtype_only():
    x32 = torch.zeros(2, 3)
    assert kernels_apply(x32) and kernels_apply(x32.double(), x32.double())
    assert not kernels_apply(x32.half())
    assert not kernels_apply(x32, x32.double())
    assert not kernels_apply(torch.full((2,), math.nan), finite=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_best_truth_equals_max_over_truths_with_ties_and_nan(dtype):
    generator = torch.Generator().manual_seed(7)
    iou = (torch.rand(3, 5, 40, generator=generator) * 4).round() / 4  # many equal values: the first one wins
    iou = iou.to(dtype)
    iou[0, 2, 5] = math.nan  # NaN wins over every value after it, and over every value before it
    iou[1, 0, 7] = iou[1, 3, 7] = math.nan  # the first NaN wins
    iou[2, :, 9] = -1.0  # a prior of an image without truths
    best, index = best_truth_of_priors(iou)
    expected_best, expected_index = iou.max(dim=1)
    assert torch.equal(best.isnan(), expected_best.isnan())
    assert torch.equal(best.nan_to_num(-7), expected_best.nan_to_num(-7))
    assert torch.equal(index, expected_index)
    assert index[1, 7] == 0 and index[0, 5] == 2


def loop_hardest_negatives(values, eligible, num_neg):
    """Per image, the eligible priors of finite or -inf value sorted by (value, prior), the first num_neg of them."""
    image, prior = [], []
    for b in range(values.shape[0]):
        candidates = sorted((values[b, p].item(), p) for p in range(values.shape[1])
                            if eligible[b, p] and values[b, p] < math.inf)
        for _, p in candidates[: int(num_neg[b])]:
            image.append(b)
            prior.append(p)
    return torch.tensor(image, dtype=torch.long), torch.tensor(prior, dtype=torch.long)


@pytest.mark.parametrize("seed", range(6))
def test_hardest_negatives_equal_a_sorting_loop(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, num_priors = 6, 300
    values = (torch.randn(batch, num_priors, generator=generator) * 3).round()  # ties at every cut
    values[0, :5] = math.nan
    values[1, :5] = math.inf
    values[2, :3] = -math.inf
    eligible = torch.rand(batch, num_priors, generator=generator) < 0.8
    eligible[4] = False  # nothing eligible
    # none; fewer than eligible; more than eligible; all but one prior
    num_neg = torch.tensor([17, 0, 40, num_priors - 1, 25, 1])
    image, prior = hardest_negatives(values, eligible, num_neg)
    expected_image, expected_prior = loop_hardest_negatives(values, eligible, num_neg)
    assert torch.equal(image, expected_image)
    assert torch.equal(prior, expected_prior)
    assert (image == 4).sum() == 0 and (image == 1).sum() == 0


def test_hardest_negatives_are_topks_choice_without_ties():
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(4, 1000, generator=generator, dtype=torch.float64)
    eligible = torch.rand(4, 1000, generator=generator) < 0.9
    num_neg = torch.tensor([90, 3, 0, 200])
    image, prior = hardest_negatives(values, eligible, num_neg)
    ranked = torch.where(eligible, values, math.inf)
    for b in range(4):
        k = int(num_neg[b])
        assert torch.equal(prior[image == b], ranked[b].topk(k, largest=False).indices)


def test_empty_inputs():
    image, prior = hardest_negatives(torch.zeros(0, 10), torch.zeros(0, 10, dtype=torch.bool),
                                     torch.zeros(0, dtype=torch.long))
    assert image.shape == prior.shape == (0,)
    truths, valid = torch.zeros(0, 1, 4), torch.zeros(0, 1, dtype=torch.bool)
    assert truth_prior_iou(truths, valid, point_form(small_priors())).shape == (0, 1, 158)
