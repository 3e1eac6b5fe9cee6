"""MultiBoxLoss: parity with the seed's per-image algorithm, options, edge cases, dtypes, properties."""

from __future__ import annotations

import pytest
import torch

from ssd_core import VOC_300, LossOutput, MultiBoxLoss, prior_boxes
from tests.ssd_core.random_data import random_predictions, random_targets, small_priors
from tests.ssd_core.seed_reference import seed_multibox_loss

SEED_ARGS = (0.5, True, 0, True, 3, 0.5, False)


def seed_criterion(num_classes: int, **options) -> MultiBoxLoss:
    return MultiBoxLoss(num_classes, *SEED_ARGS, **options)


def losses_and_grads(loss_fn, loc, conf):
    loc.grad = conf.grad = None
    loss_l, loss_c = loss_fn()
    (loss_l + 0.5 * loss_c).backward()  # different weights so both gradients are checked separately
    return loss_l.detach(), loss_c.detach(), loc.grad.clone(), conf.grad.clone()


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def assert_seed_parity(priors, targets, num_classes, generator):
    loc, conf = random_predictions(len(targets), len(priors), num_classes, generator)
    criterion = seed_criterion(num_classes)
    ours = losses_and_grads(lambda: criterion((loc, conf, priors), targets), loc, conf)
    seed = losses_and_grads(lambda: seed_multibox_loss(loc, conf, priors, targets, num_classes), loc, conf)
    for actual, expected in zip(ours, seed, strict=True):
        assert_close(actual, expected)
    return ours


@pytest.mark.parametrize("seed", range(40))
def test_seed_parity_small_priors(seed):
    generator = torch.Generator().manual_seed(seed)
    num_classes = (3, 5, 21)[seed % 3]
    targets = random_targets(1 + seed % 5, 6, num_classes, generator, allow_empty=seed % 4 != 0)
    if all(len(t) == 0 for t in targets):  # the seed divides by N = 0
        targets[0] = random_targets(1, 3, num_classes, generator, allow_empty=False)[0]
    loss_l, loss_c, _, _ = assert_seed_parity(small_priors(), targets, num_classes, generator)
    assert loss_l > 0 and loss_c > 0


@pytest.mark.parametrize("seed", range(3))
def test_seed_parity_voc300_priors(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    targets = random_targets(3, 8, 21, generator, allow_empty=False)
    assert_seed_parity(prior_boxes(VOC_300), targets, 21, generator)


def test_padded_tensor_targets_equal_list_targets():
    generator = torch.Generator().manual_seed(7)
    priors = small_priors()
    targets = random_targets(4, 5, 7, generator)
    padded = torch.full((4, 6, 5), -1.0)
    for b, t in enumerate(targets):
        padded[b, : len(t)] = t
    loc, conf = random_predictions(4, len(priors), 7, generator)
    criterion = seed_criterion(7)
    from_list = losses_and_grads(lambda: criterion((loc, conf, priors), targets), loc, conf)
    from_padded = losses_and_grads(lambda: criterion((loc, conf, priors), padded), loc, conf)
    for a, b in zip(from_list, from_padded, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compute_returns_stats_consistent_with_the_losses():
    generator = torch.Generator().manual_seed(3)
    priors = small_priors()
    targets = random_targets(5, 4, 5, generator)
    loc, conf = random_predictions(5, len(priors), 5, generator)
    output = seed_criterion(5).compute((loc, conf, priors), targets)
    assert isinstance(output, LossOutput)
    stats = output.stats
    per_image = stats.per_image()
    assert len(per_image) == 5
    assert sum(d["loss_l"] for d in per_image) == pytest.approx(float(output.loss_l.detach()), rel=1e-5)
    assert sum(d["loss_c"] for d in per_image) == pytest.approx(float(output.loss_c.detach()), rel=1e-5)
    assert [d["num_ground_truth"] for d in per_image] == [len(t) for t in targets]
    assert stats.num_negatives.tolist() == [min(3 * p, len(priors) - 1) for p in stats.num_positives.tolist()]
    assert len(stats.matched_ious) == int(stats.num_positives.sum())
    assert float(stats.matched_iou_sum.sum()) == pytest.approx(float(stats.matched_ious.sum()), rel=1e-5)
    assert not any(t.requires_grad for t in (stats.loss_l_sum, stats.loss_c_sum, stats.matched_ious))
    totals = stats.totals()
    assert totals["num_positives"] == int(stats.num_positives.sum())
    assert totals["loss_c"] == pytest.approx(float(output.loss_c.detach()), rel=1e-5)
