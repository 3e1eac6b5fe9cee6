"""MultiBoxLoss: parity with ssd.pytorch's per-image algorithm, options, edge cases, dtypes, properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssd_core import VOC_300, LossOutput, MultiBoxLoss, center_size, encode, prior_boxes
from tests.ssd_core.loss.ssd_pytorch_reference import ssd_pytorch_multibox_loss
from tests.ssd_core.random_data import random_predictions, random_targets, small_priors


def losses_and_grads(loss_fn, loc, conf):
    loc.grad = conf.grad = None
    loss_l, loss_c = loss_fn()
    (loss_l + 0.5 * loss_c).backward()  # different weights so both gradients are checked separately
    return loss_l.detach(), loss_c.detach(), loc.grad.clone(), conf.grad.clone()


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def assert_ssd_pytorch_parity(priors, targets, num_classes, generator):
    loc, conf = random_predictions(len(targets), len(priors), num_classes, generator)
    criterion = MultiBoxLoss.ssd_pytorch(num_classes)
    ours = losses_and_grads(lambda: criterion((loc, conf, priors), targets), loc, conf)
    reference = losses_and_grads(
        lambda: ssd_pytorch_multibox_loss(loc, conf, priors, targets, num_classes), loc, conf
    )
    for actual, expected in zip(ours, reference, strict=True):
        assert_close(actual, expected)
    return ours


@pytest.mark.parametrize("seed", range(40))
def test_ssd_pytorch_parity_small_priors(seed):
    generator = torch.Generator().manual_seed(seed)
    num_classes = (3, 5, 21)[seed % 3]
    targets = random_targets(1 + seed % 5, 6, num_classes, generator, allow_empty=seed % 4 != 0)
    if all(len(t) == 0 for t in targets):  # ssd.pytorch divides by N = 0
        targets[0] = random_targets(1, 3, num_classes, generator, allow_empty=False)[0]
    loss_l, loss_c, _, _ = assert_ssd_pytorch_parity(small_priors(), targets, num_classes, generator)
    assert loss_l > 0 and loss_c > 0


@pytest.mark.parametrize("seed", range(3))
def test_ssd_pytorch_parity_voc300_priors(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    targets = random_targets(3, 8, 21, generator, allow_empty=False)
    assert_ssd_pytorch_parity(prior_boxes(VOC_300), targets, 21, generator)


@pytest.mark.parametrize("options", [{}, {"use_gpu": False, "match_type": "bipartite", "loc_weight": 2.0}])
def test_ssd_pytorch_constructor_is_the_explicit_default_spelling(options):
    named = MultiBoxLoss.ssd_pytorch(5, **options)
    explicit = MultiBoxLoss(5, 0.5, True, 0, True, 3, 0.5, False, **options)
    assert vars(named) == vars(explicit)
    generator = torch.Generator().manual_seed(21)
    priors = small_priors()
    targets = random_targets(3, 4, 5, generator, allow_empty=False)
    loc, conf = random_predictions(3, len(priors), 5, generator)
    for got, want in zip(named((loc, conf, priors), targets), explicit((loc, conf, priors), targets), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_padded_tensor_targets_equal_list_targets():
    generator = torch.Generator().manual_seed(7)
    priors = small_priors()
    targets = random_targets(4, 5, 7, generator)
    padded = torch.full((4, 6, 5), -1.0)
    for b, t in enumerate(targets):
        padded[b, : len(t)] = t
    loc, conf = random_predictions(4, len(priors), 7, generator)
    criterion = MultiBoxLoss.ssd_pytorch(7)
    from_list = losses_and_grads(lambda: criterion((loc, conf, priors), targets), loc, conf)
    from_padded = losses_and_grads(lambda: criterion((loc, conf, priors), padded), loc, conf)
    for a, b in zip(from_list, from_padded, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compute_returns_stats_consistent_with_the_losses():
    generator = torch.Generator().manual_seed(3)
    priors = small_priors()
    targets = random_targets(5, 4, 5, generator)
    loc, conf = random_predictions(5, len(priors), 5, generator)
    output = MultiBoxLoss.ssd_pytorch(5).compute((loc, conf, priors), targets)
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


# ---------------------------------------------------------------------------------------------------
# Hand-made cases, one per constructor option. One truth T = (0, 0, 0.4, 0.4) and 8 priors whose IoU
# with T is, by construction: p0 1.0, p1 0.12/0.16 = 0.75, p2 0.08/0.16 = 0.5, p3 0.064/0.16 = 0.4,
# p4 0.04/0.16 = 0.25, p5..p7 0 (disjoint). Background logits make the negatives' conf loss rank
# p5 > p7 > p4 > p6 > p3 (lower background logit, higher cross-entropy).

T = [0.0, 0.0, 0.4, 0.4]
FAR = [0.6, 0.6, 1.0, 1.0]
HAND_PRIORS_XYXY = torch.tensor([
    T, [0.0, 0.0, 0.4, 0.3], [0.0, 0.0, 0.4, 0.2], [0.0, 0.0, 0.4, 0.16], [0.0, 0.0, 0.4, 0.1],
    FAR, [0.6, 0.0, 1.0, 0.4], [0.0, 0.6, 0.4, 1.0],
])
HAND_PRIORS = center_size(HAND_PRIORS_XYXY)
BACKGROUND_LOGITS = torch.tensor([0.0, 0.0, 0.0, 3.0, 1.0, -2.0, 2.0, -1.0])


def hand_inputs(num_classes=3, background=0):
    loc = torch.zeros(1, 8, 4, requires_grad=True)
    conf = torch.zeros(1, 8, num_classes)
    conf[0, :, background] = BACKGROUND_LOGITS
    return loc, conf.requires_grad_()


def selected(criterion, loc, conf, targets, priors=HAND_PRIORS):
    """Positive and negative prior indices of image 0, read from the conf gradient.

    Rows in the conf loss get softmax - one_hot(target): non-zero, with its only negative entry at the
    target class, which is an object class exactly for the positives.
    """
    loc.grad = conf.grad = None
    output = criterion.compute((loc, conf, priors), targets)
    (output.loss_l + output.loss_c).backward()
    in_conf_loss = (conf.grad[0] != 0).any(-1)
    positive = in_conf_loss & (conf.grad[0].argmin(-1) != criterion.background_label)
    return positive.nonzero().flatten().tolist(), (in_conf_loss & ~positive).nonzero().flatten().tolist(), output


def criterion(num_classes=3, overlap=0.5, prior_matching=True, background=0, mining=True, neg_pos=1,
              neg_overlap=0.5, encode_target=False, **options):
    return MultiBoxLoss(num_classes, overlap, prior_matching, background, mining, neg_pos, neg_overlap,
                        encode_target, **options)


ONE_TRUTH = [torch.tensor([[*T, 1.0]])]


def test_hard_negative_mining_picks_highest_loss_negatives():
    loc, conf = hand_inputs()
    positive, negative, output = selected(criterion(neg_pos=1), loc, conf, ONE_TRUTH)
    assert positive == [0, 1, 2]  # IoU >= 0.5
    assert negative == [4, 5, 7]  # 1 * 3 negatives: the three highest-loss of p3..p7
    stats = output.stats
    assert stats.num_positives.tolist() == [3] and stats.num_negatives.tolist() == [3]
    assert stats.num_ignored.tolist() == [0] and stats.num_forced_matches.tolist() == [0]
    assert stats.matched_ious.tolist() == pytest.approx([1.0, 0.75, 0.5])


def test_neg_pos_ratio_caps_the_negatives():
    loc, conf = hand_inputs()
    assert selected(criterion(neg_pos=0.5), loc, conf, ONE_TRUTH)[1] == [5]  # floor(0.5 * 3) = 1
    assert selected(criterion(neg_pos=0), loc, conf, ONE_TRUTH)[1] == []
    assert selected(criterion(neg_pos=3), loc, conf, ONE_TRUTH)[1] == [3, 4, 5, 6, 7]  # all 5 < 9


def test_without_mining_every_unmatched_prior_is_negative():
    loc, conf = hand_inputs()
    positive, negative, _ = selected(criterion(mining=False), loc, conf, ONE_TRUTH)
    assert positive == [0, 1, 2] and negative == [3, 4, 5, 6, 7]


def test_neg_overlap_ignores_priors_between_it_and_the_threshold():
    loc, conf = hand_inputs()
    positive, negative, output = selected(criterion(mining=False, neg_overlap=0.3), loc, conf, ONE_TRUTH)
    assert positive == [0, 1, 2] and negative == [4, 5, 6, 7]  # p3 (IoU 0.4) is ignored
    assert output.stats.num_ignored.tolist() == [1]
    positive, negative, output = selected(
        criterion(overlap=0.7, mining=False, neg_overlap=0.3), loc, conf, ONE_TRUTH
    )
    assert positive == [0, 1] and negative == [4, 5, 6, 7]  # p2 (0.5) and p3 (0.4) ignored
    assert output.stats.num_ignored.tolist() == [2]


def test_overlap_threshold_and_forced_match_statistics():
    loc, conf = hand_inputs()
    positive, _, output = selected(criterion(overlap=1.0), loc, conf, ONE_TRUTH)
    assert positive == [0]  # IoU 1.0 >= 1.0
    small = [torch.tensor([[0.0, 0.0, 0.1, 0.1, 0.0]])]  # best prior p4 with IoU 0.01 / 0.04 = 0.25
    positive, _, output = selected(criterion(), loc, conf, small)
    assert positive == [4]  # only the forced best prior
    assert output.stats.num_forced_matches.tolist() == [1]
    assert output.stats.matched_ious.tolist() == pytest.approx([0.25])


def test_bkg_label_moves_the_background_column_and_maps_labels_around_it():
    loc, conf = hand_inputs(num_classes=4, background=2)
    targets = [torch.tensor([[*T, 2.0], [*FAR, 0.0]])]  # label 2 -> class 3, label 0 -> class 0
    positive, negative, _ = selected(criterion(num_classes=4, background=2, neg_pos=1), loc, conf, targets)
    assert positive == [0, 1, 2, 5]
    # the cross-entropy gradient is softmax - one_hot: its only negative entry is the target class
    target_class = conf.grad[0].argmin(dim=-1)
    assert target_class[positive].tolist() == [3, 3, 3, 0]
    assert target_class[negative].tolist() == [2] * len(negative)
    assert negative == [3, 4, 6, 7]  # 1 * 4 negatives, all remaining priors


def test_prior_for_matching_false_matches_decoded_predictions():
    loc, conf = hand_inputs()
    predicted = torch.tensor([FAR] * 8)
    predicted[5] = torch.tensor(T)  # only p5 predicts a box on the truth
    with torch.no_grad():
        loc[0] = encode(predicted, HAND_PRIORS)
    positive, _, output = selected(criterion(prior_matching=False), loc, conf, ONE_TRUTH)
    assert positive == [5]
    assert output.stats.matched_ious.tolist() == pytest.approx([1.0], abs=1e-5)
    # the regression target is still encoded against the prior: loc[5] is exactly it
    assert output.loss_l.item() == pytest.approx(0.0, abs=1e-5)
    assert selected(criterion(prior_matching=True), loc, conf, ONE_TRUTH)[0] == [0, 1, 2]


def test_encode_target_compares_raw_offsets_divided_by_the_variance():
    loc, conf = hand_inputs()
    raw = encode(torch.tensor([T] * 8), HAND_PRIORS, (1.0, 1.0))  # [8, 4] raw offsets
    with torch.no_grad():
        loc[0] = raw
        loc[0, 1, 0] += 0.01  # p1: centre-x off by 0.01 raw = 0.1 after dividing by variance 0.1
    _, _, output = selected(criterion(encode_target=True), loc, conf, ONE_TRUTH)
    # Smooth L1 of 0.1 is 0.5 * 0.1 ** 2; three positives
    assert output.loss_l.item() == pytest.approx(0.5 * 0.1**2 / 3, rel=1e-4)
    _, _, plain = selected(criterion(encode_target=False), loc, conf, ONE_TRUTH)
    assert plain.loss_l.item() > 0.01  # the same raw offsets are wrong for the variance-encoded target


def test_variance_and_loc_weight():
    loc, conf = hand_inputs()
    with torch.no_grad():
        loc[0] = encode(torch.tensor([T] * 8), HAND_PRIORS, (0.2, 0.3))
        loc[0, 0, 2] += 2.0  # p0: width offset off by 2 -> Smooth L1 = 2 - 0.5 = 1.5
    base = criterion(variance=(0.2, 0.3)).compute((loc, conf, HAND_PRIORS), ONE_TRUTH)
    assert base.loss_l.item() == pytest.approx(1.5 / 3, rel=1e-5)
    weighted = criterion(variance=(0.2, 0.3), loc_weight=2.0).compute((loc, conf, HAND_PRIORS), ONE_TRUTH)
    assert weighted.loss_l.item() == pytest.approx(2 * 1.5 / 3, rel=1e-5)
    assert weighted.loss_c.item() == pytest.approx(base.loss_c.item())


def test_bipartite_gives_each_truth_its_own_prior():
    # IoU: T0-pA 0.0625/0.09 = 0.694, T0-pB 0.09/0.16 = 0.5625, T1-pA 0.04/0.0625 = 0.64, T1-pB 0.25
    priors = center_size(torch.tensor([[0.0, 0.0, 0.25, 0.25], [0.0, 0.0, 0.4, 0.4], FAR]))
    targets = [torch.tensor([[0.0, 0.0, 0.3, 0.3, 0.0], [0.0, 0.0, 0.2, 0.2, 1.0]])]
    loc = torch.zeros(1, 3, 4, requires_grad=True)
    conf = torch.zeros(1, 3, 3, requires_grad=True)
    # ssd.pytorch's rule at threshold 0.7: both truths' best prior is pA, the later truth (class 2) takes it
    positive, _, output = selected(criterion(overlap=0.7), loc, conf, targets, priors)
    assert positive == [0] and conf.grad[0, 0].argmin().item() == 2
    assert output.stats.num_forced_matches.tolist() == [2]
    # bipartite: (T0, pA) is the best pair, then T1 takes pB
    positive, _, output = selected(criterion(overlap=0.7, match_type="bipartite"), loc, conf, targets, priors)
    assert positive == [0, 1]
    assert conf.grad[0, :2].argmin(dim=-1).tolist() == [1, 2]


def test_difficult_truths_priors_are_neither_positive_nor_negative():
    loc, conf = hand_inputs()
    targets = [torch.tensor([[*T, 0.0, 1.0], [*FAR, 1.0, 0.0]])]  # T difficult
    positive, negative, output = selected(criterion(mining=False), loc, conf, targets)
    assert positive == [5]
    assert negative == [3, 4, 6, 7]  # p0..p2 matched to the difficult truth are ignored
    assert output.stats.num_ignored.tolist() == [3]
    assert output.stats.num_ground_truth.tolist() == [2]
    # priors whose IoU with a difficult truth reaches neg_overlap are not negatives either
    positive, negative, _ = selected(criterion(mining=False, neg_overlap=0.4, overlap=0.4), loc, conf, targets)
    assert positive == [5] and negative == [4, 6, 7]


def test_use_gpu_is_accepted_and_computation_follows_the_inputs():
    loc, conf = hand_inputs()
    a = criterion(use_gpu=True).compute((loc, conf, HAND_PRIORS), ONE_TRUTH)
    b = criterion(use_gpu=False).compute((loc, conf, HAND_PRIORS), ONE_TRUTH)
    assert a.loss_l.device.type == "cpu"
    assert a.loss_c.item() == b.loss_c.item() and a.loss_l.item() == b.loss_l.item()


# ---------------------------------------------------------------------------------------------------
# Edge cases and validation


def test_image_without_boxes_contributes_nothing():
    generator = torch.Generator().manual_seed(11)
    priors = small_priors()
    targets = random_targets(1, 4, 5, generator, allow_empty=False)
    loc, conf = random_predictions(2, len(priors), 5, generator)
    crit = MultiBoxLoss.ssd_pytorch(5)
    both = losses_and_grads(lambda: crit((loc, conf, priors), [targets[0], torch.zeros(0, 5)]), loc, conf)
    alone = losses_and_grads(lambda: crit((loc[:1], conf[:1], priors), targets), loc, conf)
    assert_close(both[0], alone[0])
    assert_close(both[1], alone[1])
    assert (both[2][1] == 0).all() and (both[3][1] == 0).all()  # no gradient for the empty image
    stats = crit.compute((loc, conf, priors), [targets[0], torch.zeros(0, 5)]).stats
    assert stats.num_positives[1] == 0 and stats.num_negatives[1] == 0 and stats.num_ignored[1] == 0


@pytest.mark.parametrize("options", [{}, {"match_type": "bipartite"}])
def test_batch_without_boxes_gives_zero_loss_and_zero_gradients(options):
    generator = torch.Generator().manual_seed(12)
    priors = small_priors()
    loc, conf = random_predictions(3, len(priors), 4, generator)
    for targets in ([torch.zeros(0, 5)] * 3, torch.full((3, 2, 5), -1.0)):
        loss_l, loss_c, loc_grad, conf_grad = losses_and_grads(
            lambda t=targets: MultiBoxLoss.ssd_pytorch(4, **options)((loc, conf, priors), t), loc, conf
        )
        assert loss_l.item() == 0 and loss_c.item() == 0
        assert torch.equal(loc_grad, torch.zeros_like(loc)) and torch.equal(conf_grad, torch.zeros_like(conf))


def test_per_row_log_sum_exp_does_not_underflow_where_ssd_pytorch_does():
    generator = torch.Generator().manual_seed(13)
    priors = small_priors()
    targets = random_targets(2, 3, 4, generator, allow_empty=False)
    loc, conf = random_predictions(2, len(priors), 4, generator)
    with torch.no_grad():
        conf[1, 0, 1] = 500.0  # one huge logit: ssd.pytorch's single global max underflows every other row
    _, loss_c = MultiBoxLoss.ssd_pytorch(4)((loc, conf, priors), targets)
    _, reference_c = ssd_pytorch_multibox_loss(loc, conf, priors, targets, 4)
    # float64 keeps exp(x - 500) representable, so there ssd.pytorch's mining is still right
    _, reference_c64 = ssd_pytorch_multibox_loss(loc.double(), conf.double(), priors.double(), targets, 4)
    assert loss_c.item() == pytest.approx(reference_c64.item(), rel=1e-5)
    assert reference_c.item() != pytest.approx(reference_c64.item(), rel=1e-3)  # float32 ssd.pytorch mined -inf rows


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([0.2, 0.1, 0.2, 0.5], r"targets\[1\]\[0\]: box .* has x2 <= x1"),
        ([0.2, 0.5, 0.4, 0.5], r"targets\[1\]\[0\]: box .* has y2 <= y1"),
        ([0.5, 0.5, 0.1, 0.1], r"targets\[1\]\[0\]: box .* has x2 <= x1"),
        ([float("nan"), 0.1, 0.2, 0.5], r"targets\[1\]\[0\]: box .* non-finite"),
        ([0.1, 0.1, 0.2, float("inf")], r"targets\[1\]\[0\]: box .* non-finite"),
    ],
)
def test_invalid_boxes_raise_naming_image_and_box(box, message):
    priors = small_priors()
    loc, conf = torch.zeros(2, len(priors), 4), torch.zeros(2, len(priors), 3)
    targets = [torch.tensor([[0.1, 0.1, 0.3, 0.3, 0.0]]), torch.tensor([[*box, 1.0]])]
    with pytest.raises(ValueError, match=message):
        MultiBoxLoss.ssd_pytorch(3)((loc, conf, priors), targets)


@pytest.mark.parametrize("label", [-0.5, 2.0, 1.5])
def test_label_outside_the_classes_raises(label):
    priors = small_priors()
    loc, conf = torch.zeros(1, len(priors), 4), torch.zeros(1, len(priors), 3)
    with pytest.raises(ValueError, match=r"targets\[0\]\[0\]: label"):
        MultiBoxLoss.ssd_pytorch(3)((loc, conf, priors), [torch.tensor([[0.1, 0.1, 0.3, 0.3, label]])])


def test_negative_labels_are_padding_in_padded_tensors():
    priors = small_priors()
    loc, conf = torch.zeros(1, len(priors), 4), torch.zeros(1, len(priors), 3)
    output = MultiBoxLoss.ssd_pytorch(3).compute((loc, conf, priors), torch.tensor([[[0.1, 0.1, 0.3, 0.3, -1.0]]]))
    assert output.stats.num_ground_truth.tolist() == [0]


def test_shape_errors_name_the_tensor():
    priors = small_priors()
    P = len(priors)
    crit = MultiBoxLoss.ssd_pytorch(3)
    targets = [torch.tensor([[0.1, 0.1, 0.3, 0.3, 0.0]])]
    cases = [
        ((torch.zeros(1, P, 3), torch.zeros(1, P, 3), priors), r"loc must be \[B, P, 4\]"),
        ((torch.zeros(1, P, 4), torch.zeros(1, P, 5), priors), r"conf must be \[B, P, num_classes=3\]"),
        ((torch.zeros(1, P, 4), torch.zeros(1, P - 1, 3), priors), r"conf .* and loc .* differ"),
        ((torch.zeros(1, P, 4), torch.zeros(1, P, 3), priors[:-1]), rf"priors must be \[P={P}, 4\]"),
        ((torch.zeros(2, P, 4), torch.zeros(2, P, 3), priors), r"targets hold 1 images, loc has batch size 2"),
    ]
    for predictions, message in cases:
        with pytest.raises(ValueError, match=message):
            crit(predictions, targets)


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        ((1, 0.5, True, 0, True, 3, 0.5, False), {}, "num_classes"),
        ((3, 0.0, True, 0, True, 3, 0.5, False), {}, "overlap_thresh"),
        ((3, 1.5, True, 0, True, 3, 0.5, False), {}, "overlap_thresh"),
        ((3, 0.5, True, 3, True, 3, 0.5, False), {}, "bkg_label"),
        ((3, 0.5, True, 0, True, -1, 0.5, False), {}, "neg_pos"),
        ((3, 0.5, True, 0, True, 3, 0.0, False), {}, "neg_overlap"),
        ((3, 0.5, True, 0, True, 3, 0.5, False), {"match_type": "greedy"}, "match_type"),
        ((3, 0.5, True, 0, True, 3, 0.5, False), {"variance": (0.1, 0.0)}, "variance"),
        ((3, 0.5, True, 0, True, 3, 0.5, False), {"loc_weight": -1.0}, "loc_weight"),
    ],
)
def test_bad_options_raise(args, options, message):
    with pytest.raises(ValueError, match=message):
        MultiBoxLoss(*args, **options)


# ---------------------------------------------------------------------------------------------------
# dtypes and gradients


def test_bfloat16_inputs_are_computed_in_float32():
    generator = torch.Generator().manual_seed(14)
    priors = small_priors()
    targets = random_targets(3, 4, 5, generator, allow_empty=False)
    loc, conf = random_predictions(3, len(priors), 5, generator, dtype=torch.bfloat16)
    crit = MultiBoxLoss.ssd_pytorch(5)
    loss_l, loss_c = crit((loc, conf, priors), targets)
    assert loss_l.dtype == loss_c.dtype == torch.float32
    (loss_l + loss_c).backward()
    assert loc.grad.dtype == torch.bfloat16 and torch.isfinite(conf.grad.float()).all()
    exact_l, exact_c = crit((loc.detach().float(), conf.detach().float(), priors), targets)
    assert loss_l.item() == pytest.approx(exact_l.item(), rel=1e-6)
    assert loss_c.item() == pytest.approx(exact_c.item(), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_l, auto_c = crit((loc.detach().float(), conf.detach().float(), priors), targets)
    assert auto_l.dtype == torch.float32 and auto_c.item() == pytest.approx(exact_c.item(), rel=1e-6)


@pytest.mark.parametrize("options", [{}, {"match_type": "bipartite", "encode_target": True}])
def test_gradcheck_float64(options):
    generator = torch.Generator().manual_seed(15)
    priors = small_priors()[:40].double()
    targets = [t.double() for t in random_targets(2, 3, 3, generator, allow_empty=False)]
    loc, conf = random_predictions(2, len(priors), 3, generator, dtype=torch.float64)
    crit = MultiBoxLoss(3, 0.5, True, 0, True, 3, 0.5, options.pop("encode_target", False), **options)
    output = crit.compute((loc, conf, priors), targets)
    assert output.stats.num_positives.sum() > 0 and output.stats.num_negatives.sum() > 0
    assert torch.autograd.gradcheck(lambda lo, co: crit((lo, co, priors), targets), (loc, conf))


# ---------------------------------------------------------------------------------------------------
# Properties

PROPERTY_PRIORS = small_priors()
PROPERTY_CLASSES = 4


@st.composite
def batches(draw, max_images=3, max_boxes=5):
    """Targets drawn by hypothesis (boxes jittered by a drawn seed so IoU ties between truths vanish)
    and random predictions from the same seed."""
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    coordinate = st.floats(0.0, 1.0, allow_nan=False)
    targets = []
    for _ in range(draw(st.integers(1, max_images))):
        rows = []
        for _ in range(draw(st.integers(0, max_boxes))):
            x1, x2 = sorted((draw(coordinate), draw(coordinate)))
            y1, y2 = sorted((draw(coordinate), draw(coordinate)))
            label = draw(st.integers(0, PROPERTY_CLASSES - 2))
            rows.append([x1, y1, x2 + 0.02, y2 + 0.02, label])
        boxes = torch.tensor(rows).reshape(-1, 5)
        boxes[:, :4] += 1e-3 * torch.rand(len(boxes), 4, generator=generator)
        targets.append(boxes)
    loc, conf = random_predictions(len(targets), len(PROPERTY_PRIORS), PROPERTY_CLASSES, generator)
    return loc, conf, targets


@given(batch=batches(), match_type=st.sampled_from(["per_prediction", "bipartite"]),
       mining=st.booleans(), prior_matching=st.booleans())
def test_losses_are_finite_and_non_negative(batch, match_type, mining, prior_matching):
    loc, conf, targets = batch
    crit = MultiBoxLoss(PROPERTY_CLASSES, 0.5, prior_matching, 0, mining, 3, 0.4, False, match_type=match_type)
    output = crit.compute((loc, conf, PROPERTY_PRIORS), targets)
    for loss in (output.loss_l, output.loss_c):
        assert torch.isfinite(loss) and loss.item() >= 0
    (output.loss_l + output.loss_c).backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(conf.grad).all()
    assert (output.stats.num_positives <= output.stats.num_ground_truth * len(PROPERTY_PRIORS)).all()


@given(batch=batches(max_images=2), order=st.randoms(use_true_random=False))
def test_bipartite_loss_does_not_depend_on_the_order_of_truths(batch, order):
    loc, conf, targets = batch
    crit = MultiBoxLoss.ssd_pytorch(PROPERTY_CLASSES, match_type="bipartite")
    permuted = []
    for t in targets:
        index = list(range(len(t)))
        order.shuffle(index)
        permuted.append(t[index])
    with torch.no_grad():
        a = crit((loc, conf, PROPERTY_PRIORS), targets)
        b = crit((loc, conf, PROPERTY_PRIORS), permuted)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@given(batch=batches(), shift=st.floats(-5.0, 5.0, allow_nan=False))
def test_moving_predictions_of_non_selected_priors_does_not_change_the_loss(batch, shift):
    loc, conf, targets = batch
    crit = MultiBoxLoss.ssd_pytorch(PROPERTY_CLASSES)
    output = crit.compute((loc, conf, PROPERTY_PRIORS), targets)
    (output.loss_l + output.loss_c).backward()
    unused = (conf.grad == 0).all(-1)  # [B, P]: neither positive nor negative
    moved_loc = loc.detach().clone()
    moved_loc[unused] += shift  # translate the predicted boxes of those priors
    with torch.no_grad():
        moved = crit((moved_loc, conf, PROPERTY_PRIORS), targets)
    assert moved[0].item() == output.loss_l.item()
    assert moved[1].item() == output.loss_c.item()
