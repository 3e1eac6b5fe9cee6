"""MatchStats by class: a hand-made batch worked out here, per-class sums equal to the totals and to a
slow per-prior reference on random batches (any bkg_label), and the summaries built from them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ssd_core import ClassStats, MultiBoxLoss, encode
from tests.ssd_core.loss.test_multibox import (
    BACKGROUND_LOGITS,
    HAND_PRIORS,
    PROPERTY_CLASSES,
    PROPERTY_PRIORS,
    T,
    batches,
    criterion,
    hand_inputs,
)

SMALL = [0.0, 0.0, 0.1, 0.1]  # best prior p4 (IoU 0.01 / 0.04 = 0.25): matched only by the forced step


def test_hand_made_batch_per_class():
    """Truth T of label 1 takes p0, p1, p2 (IoU 1, 0.75, 0.5); SMALL of label 0 is forced onto p4."""
    loc, conf = hand_inputs(num_classes=3)
    targets = [torch.tensor([[*T, 1.0], [*SMALL, 0.0]])]
    output = criterion(neg_pos=1).compute((loc, conf, HAND_PRIORS), targets)
    per_class = output.stats.per_class
    assert per_class.num_ground_truth.tolist() == [1, 1]
    assert per_class.num_positives.tolist() == [1, 3]
    assert per_class.num_forced_matches.tolist() == [1, 0]
    assert per_class.matched_iou_sum.tolist() == pytest.approx([0.25, 1.0 + 0.75 + 0.5])

    def smooth_l1(truth, prior):  # loc predicts 0: the loss of the encoded target itself
        return float(F.smooth_l1_loss(torch.zeros(4), encode(torch.tensor([truth]), HAND_PRIORS[[prior]])[0],
                                      reduction="sum"))

    assert per_class.loss_l_sum.tolist() == pytest.approx([smooth_l1(SMALL, 4), sum(smooth_l1(T, p) for p in (0, 1, 2))])
    # conf: object logits 0, background logit b -> positive loss log(e^b + 2), negative loss log(e^b + 2) - b
    background = BACKGROUND_LOGITS.tolist()
    positive_loss = [math.log(math.exp(background[p]) + 2) for p in range(8)]
    assert per_class.loss_c_sum.tolist() == pytest.approx([positive_loss[4], sum(positive_loss[:3])])
    negatives = (3, 5, 6, 7)  # 1 * 4 positives: every remaining prior
    assert float(per_class.negative_loss_c_sum) == pytest.approx(sum(positive_loss[p] - background[p] for p in negatives))
    assert float(per_class.normalizer) == 4

    rows = per_class.rows(["rectangle", "ellipse"])
    assert rows[0] == pytest.approx({
        "label": 0, "class_name": "rectangle", "num_ground_truth": 1, "num_positives": 1, "num_forced_matches": 1,
        "positives_per_box": 1.0, "mean_matched_iou": 0.25, "loss_l": smooth_l1(SMALL, 4) / 4,
        "loss_c": positive_loss[4] / 4,
    })
    assert rows[1]["positives_per_box"] == 3.0 and rows[1]["mean_matched_iou"] == pytest.approx(0.75)


def test_a_class_without_truths_reads_zero():
    loc, conf = hand_inputs(num_classes=4)
    output = criterion(num_classes=4).compute((loc, conf, HAND_PRIORS), [torch.tensor([[*T, 2.0]])])
    row = output.stats.per_class.rows(["a", "b", "c"])[0]
    assert {k: row[k] for k in ("num_ground_truth", "num_positives", "positives_per_box", "mean_matched_iou",
                                "loss_l", "loss_c")} == dict.fromkeys(
        ("num_ground_truth", "num_positives", "positives_per_box", "mean_matched_iou", "loss_l", "loss_c"), 0)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        output.stats.per_class.rows(["a", "b"])


def slow_per_class(crit: MultiBoxLoss, conf, grad, targets):
    """Per-class positives, truths and positives' conf-loss sums, prior by prior: a positive row of the
    conf gradient (softmax - one_hot) has its only negative entry at its object class's column."""
    num_labels = crit.num_classes - 1
    positives, losses = [0] * num_labels, [0.0] * num_labels
    negative_loss = 0.0
    log_probs = torch.log_softmax(conf.detach(), dim=-1)
    for b in range(conf.shape[0]):
        for p in range(conf.shape[1]):
            if not (grad[b, p] != 0).any():
                continue
            column = int(grad[b, p].argmin())
            if column == crit.background_label:
                negative_loss -= float(log_probs[b, p, column])
                continue
            label = column - (column > crit.background_label)
            positives[label] += 1
            losses[label] -= float(log_probs[b, p, column])
    truths = [0] * num_labels
    for t in targets:
        for label in t[:, 4].long().tolist():
            truths[label] += 1
    return positives, losses, negative_loss, truths


@given(batch=batches(), background=st.integers(0, PROPERTY_CLASSES - 1), mining=st.booleans(),
       match_type=st.sampled_from(["per_prediction", "bipartite"]), difficult_seed=st.integers(0, 2**16))
def test_per_class_sums_equal_the_totals_and_a_slow_reference(batch, background, mining, match_type, difficult_seed):
    loc, conf, targets = batch
    generator = torch.Generator().manual_seed(difficult_seed)
    targets = [torch.cat((t, (torch.rand(len(t), 1, generator=generator) < 0.2).float()), dim=1) for t in targets]
    crit = MultiBoxLoss(PROPERTY_CLASSES, 0.5, True, background, mining, 3, 0.4, False, match_type=match_type)
    output = crit.compute((loc, conf, PROPERTY_PRIORS), targets)
    (output.loss_l + output.loss_c).backward()
    stats, per_class = output.stats, output.stats.per_class
    assert per_class.num_ground_truth.sum() == stats.num_ground_truth.sum()
    assert per_class.num_positives.sum() == stats.num_positives.sum()
    assert per_class.num_forced_matches.sum() == stats.num_forced_matches.sum()
    for name in ("matched_iou_sum", "loss_l_sum"):
        torch.testing.assert_close(getattr(per_class, name).sum(), getattr(stats, name).sum())
    torch.testing.assert_close(per_class.loss_c_sum.sum() + per_class.negative_loss_c_sum, stats.loss_c_sum.sum())
    assert per_class.normalizer == stats.normalizer

    positives, losses, negative_loss, truths = slow_per_class(crit, conf, conf.grad, targets)
    assert per_class.num_positives.tolist() == positives
    assert per_class.num_ground_truth.tolist() == truths
    assert per_class.loss_c_sum.tolist() == pytest.approx(losses, rel=1e-4, abs=1e-4)
    assert float(per_class.negative_loss_c_sum) == pytest.approx(negative_loss, rel=1e-4, abs=1e-4)


def test_class_stats_add_up_over_batches():
    generator = torch.Generator().manual_seed(2)
    crit = criterion(num_classes=PROPERTY_CLASSES, neg_pos=3)
    outputs = []
    for _ in range(2):
        targets = [torch.tensor([[0.1, 0.1, 0.5, 0.6, float(torch.randint(0, 3, (1,), generator=generator))]])]
        loc = torch.randn(1, len(PROPERTY_PRIORS), 4, generator=generator)
        conf = torch.randn(1, len(PROPERTY_PRIORS), PROPERTY_CLASSES, generator=generator)
        outputs.append(crit.compute((loc, conf, PROPERTY_PRIORS), targets).stats.per_class)
    pooled = outputs[0] + outputs[1]
    assert isinstance(pooled, ClassStats)
    assert pooled.num_positives.tolist() == (outputs[0].num_positives + outputs[1].num_positives).tolist()
    assert float(pooled.normalizer) == float(outputs[0].normalizer + outputs[1].normalizer)
    assert float(pooled.negative_loss_c_sum) == pytest.approx(
        float(outputs[0].negative_loss_c_sum + outputs[1].negative_loss_c_sum))
