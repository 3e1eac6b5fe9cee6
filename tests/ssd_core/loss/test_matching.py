"""Batched matching against per-element loops: ssd.pytorch's rule and Caffe's greedy bipartite step."""

from __future__ import annotations

import pytest
import torch

from ssd_core.loss.matching import match, pairwise_iou
from ssd_core.loss.targets import pad_targets
from ssd_core.ops.boxes import point_form
from tests.ssd_core.random_data import random_boxes, small_priors


def loop_match_ssd_pytorch(iou, valid, threshold):
    """ssd.pytorch's rule per image and truth, written with plain loops."""
    batch, _, num_priors = iou.shape
    truth_idx = torch.zeros(batch, num_priors, dtype=torch.long)
    matched = torch.zeros(batch, num_priors, dtype=torch.bool)
    for b in range(batch):
        truths = [j for j in range(iou.shape[1]) if valid[b, j]]
        if not truths:
            continue
        for p in range(num_priors):
            best = max(truths, key=lambda j: (iou[b, j, p].item(), -j))  # first index on ties
            truth_idx[b, p] = best
            matched[b, p] = iou[b, best, p] >= threshold
        for j in truths:  # later truths overwrite earlier ones
            p = int(iou[b, j].argmax())
            truth_idx[b, p] = j
            matched[b, p] = True
    return truth_idx, matched


def loop_match_bipartite(iou, valid, threshold):
    """Caffe's greedy bipartite step, one pair at a time, then the threshold step."""
    batch, num_truths, num_priors = iou.shape
    truth_idx = torch.zeros(batch, num_priors, dtype=torch.long)
    matched = torch.zeros(batch, num_priors, dtype=torch.bool)
    for b in range(batch):
        truths = {j for j in range(num_truths) if valid[b, j]}
        priors = set(range(num_priors))
        for p in priors:
            if truths:
                best = max(truths, key=lambda j: (iou[b, j, p].item(), -j))
                truth_idx[b, p] = best
                matched[b, p] = iou[b, best, p] >= threshold
        while truths:
            # Caffe's order: strictly better wins, scanning priors then truths (lowest index on ties)
            value, p, j = min((-iou[b, j, p].item(), p, j) for j in truths for p in priors)
            if -value <= 0:
                break
            truth_idx[b, p], matched[b, p] = j, True
            truths.remove(j)
            priors.remove(p)
    return truth_idx, matched


def random_case(seed, batch=4, max_truths=5):
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(0, max_truths + 1, (1,), generator=generator))
        targets.append(torch.cat((random_boxes(n, generator), torch.zeros(n, 1)), dim=1))
    padded = pad_targets(targets)
    priors = point_form(small_priors())
    valid = padded[..., 4] >= 0
    return pairwise_iou(padded[..., :4], valid, priors), valid


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("match_type", ["per_prediction", "bipartite"])
def test_batched_match_equals_loop(seed, match_type):
    iou, valid = random_case(seed)
    result = match(iou, valid, 0.5, match_type)
    reference = loop_match_ssd_pytorch if match_type == "per_prediction" else loop_match_bipartite
    truth_idx, matched = reference(iou, valid, 0.5)
    assert torch.equal(result.matched, matched)
    assert torch.equal(result.truth_idx[matched], truth_idx[matched])
    expected_iou = iou.gather(1, truth_idx[:, None]).squeeze(1)
    torch.testing.assert_close(result.matched_iou[matched], expected_iou[matched])


@pytest.mark.parametrize("seed", range(4))
def test_truth_best_iou_and_forced_prior_equal_a_per_truth_loop(seed):
    iou, valid = random_case(seed)
    # every prior twice: each truth's best prior is tied, and the forced step must claim the first of
    # the two, as ssd.pytorch's max gives it; a threshold no IoU reaches leaves only forced matches
    iou = torch.cat((iou, iou), dim=2)
    result = match(iou, valid, 1.01)
    truth_idx, matched = loop_match_ssd_pytorch(iou, valid, 1.01)
    assert torch.equal(result.matched, matched)
    assert torch.equal(result.truth_idx[matched], truth_idx[matched])
    assert not result.matched[:, iou.shape[2] // 2 :].any()
    expected = torch.tensor([[iou[b, j].max().item() if valid[b, j] else 0.0 for j in range(valid.shape[1])]
                             for b in range(valid.shape[0])])
    assert torch.equal(result.truth_best_iou, expected)


def test_later_truth_wins_a_shared_best_prior():
    # two truths whose best prior is the same single prior: ssd.pytorch gives it to the later truth
    priors = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    truths = torch.tensor([[[0.0, 0.0, 0.3, 0.3], [0.0, 0.0, 0.2, 0.2]]])
    iou = pairwise_iou(truths, torch.ones(1, 2, dtype=torch.bool), priors)
    result = match(iou, torch.ones(1, 2, dtype=torch.bool), 0.5)
    assert result.matched.tolist() == [[True, False]]
    assert result.truth_idx[0, 0].item() == 1
    bipartite = match(iou, torch.ones(1, 2, dtype=torch.bool), 0.5, "bipartite")
    # bipartite: the better pair (truth 0, prior 0) first; truth 1 overlaps nothing else, stays unmatched
    assert bipartite.matched.tolist() == [[True, False]] and bipartite.truth_idx[0, 0].item() == 0


def test_padding_never_matches_and_empty_images_have_no_matches():
    valid = torch.tensor([[True, False, False], [False, False, False]])
    iou = torch.rand(2, 3, 10).masked_fill(~valid[:, :, None], -1.0)
    result = match(iou, valid, 0.1)
    assert (result.truth_idx[0] == 0).all()
    assert not result.matched[1].any()
    assert (result.best_iou[1] == 0).all()


def test_unknown_match_type_raises():
    with pytest.raises(ValueError, match="match_type"):
        match(torch.rand(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), 0.5, "greedy")
