"""Partial labels: MultiBoxLoss's class mask, its hand-made cases, parity and the Trainer's plumbing."""

from __future__ import annotations

import pytest
import torch

from ssd_core import MultiBoxLoss
from ssd_core.loss.partial_labels import labelled_class_mask
from ssd_core.training.trainer import TrainConfig, Trainer
from tests.ssd_core.loss.test_multibox import (
    FAR,
    HAND_PRIORS,
    ONE_TRUTH,
    criterion,
    hand_inputs,
    losses_and_grads,
    selected,
)
from tests.ssd_core.random_data import random_predictions, random_targets, small_priors

# Hand-made: truth T (label 1 = column 2) fits p0..p2; an unboxed object of class 0 (column 1) lies on
# p5 and the network already sees it there (column 1 logit 6). p6's column-1 logit 10 makes it the
# hardest negative of the unmasked loss. Background logits of p3..p7 are 3, 1, -2, 2, -1.
UNDECLARED_COLUMN = 1


def hand_conf_with_unboxed_object():
    loc, conf = hand_inputs(num_classes=3)
    with torch.no_grad():
        conf[0, 5, UNDECLARED_COLUMN] = 6.0
        conf[0, 6, UNDECLARED_COLUMN] = 10.0
    return loc, conf


def test_an_unboxed_object_of_an_undeclared_class_is_not_taught_as_background():
    loc, conf = hand_conf_with_unboxed_object()
    positive, negative, _ = selected(criterion(neg_pos=1), loc, conf, ONE_TRUTH)
    assert positive == [0, 1, 2] and negative == [5, 6, 7]  # p6, p5 (column 2 high), p7
    assert conf.grad[0, 5, UNDECLARED_COLUMN] > 0.3  # softmax ~1 there, over N = 3: taught "not class 0"

    mask = labelled_class_mask([[1]], num_classes=3)
    assert mask.tolist() == [[True, False, True]]
    loc.grad = conf.grad = None
    output = criterion(neg_pos=1).compute((loc, conf, HAND_PRIORS), ONE_TRUTH, class_mask=mask)
    (output.loss_l + output.loss_c).backward()
    grad = conf.grad[0]  # [P, C]
    # the undeclared column takes no part in any softmax: no gradient anywhere
    assert (grad[:, UNDECLARED_COLUMN] == 0).all()
    # ranking over (background, column 2) only: background logits 3, 1, -2, 2, -1 -> p5, p7, p4
    in_conf_loss = (grad != 0).any(-1).nonzero().flatten().tolist()
    assert in_conf_loss == [0, 1, 2, 4, 5, 7]
    # p5's loss is -log softmax((-2, 0))[0], by hand
    expected_p5 = -torch.log_softmax(torch.tensor([-2.0, 0.0]), 0)[0]
    expected = sum(-torch.log_softmax(torch.tensor(row), 0)[i] for row, i in (
        ([0.0, 0.0], 1), ([0.0, 0.0], 1), ([0.0, 0.0], 1), ([1.0, 0.0], 0), ([-1.0, 0.0], 0))) + expected_p5
    assert output.loss_c.item() == pytest.approx(float(expected) / 3, rel=1e-6)


def test_a_declared_class_column_is_still_taught_at_negatives():
    loc, conf = hand_conf_with_unboxed_object()
    mask = labelled_class_mask([[1]], num_classes=3)
    criterion(neg_pos=1).compute((loc, conf, HAND_PRIORS), ONE_TRUTH, class_mask=mask)[1].backward()
    assert conf.grad[0, 5, 2] > 0  # column 2 (declared) is pushed down at the negative p5


def masked_reference(loss: MultiBoxLoss, loc, conf, priors, targets, mask):
    """The unmasked loss on conf whose unused columns are pushed to -1e30 (softmax 0 there)."""
    used = mask.clone()
    used[:, loss.background_label] = True
    return loss((loc, conf.masked_fill(~used[:, None, :], -1e30), priors), targets)


@pytest.mark.parametrize("seed", range(6))
def test_masked_loss_equals_the_loss_on_conf_with_undeclared_columns_at_minus_infinity(seed):
    generator = torch.Generator().manual_seed(seed)
    num_classes, background = 5, seed % 3
    targets = random_targets(4, 4, num_classes, generator, allow_empty=False)
    labelled = [None, *[sorted({int(v) for v in t[:, 4]} | {seed % 4}) for t in targets[1:]]]
    mask = labelled_class_mask(labelled, num_classes, background)
    priors = small_priors()
    loc, conf = random_predictions(len(targets), len(priors), num_classes, generator)
    loss = criterion(num_classes=num_classes, background=background, neg_pos=3)
    ours = losses_and_grads(lambda: loss((loc, conf, priors), targets, mask), loc, conf)
    reference = losses_and_grads(lambda: masked_reference(loss, loc, conf, priors, targets, mask), loc, conf)
    for actual, expected in zip(ours, reference, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    unmasked = losses_and_grads(lambda: loss((loc, conf, priors), targets), loc, conf)
    assert not torch.equal(unmasked[3], ours[3])  # the mask did change something


@pytest.mark.parametrize("background", [0, 2])
def test_every_class_declared_equals_no_mask(background):
    generator = torch.Generator().manual_seed(11)
    targets = random_targets(3, 5, 4, generator, allow_empty=False)
    priors = small_priors()
    loc, conf = random_predictions(3, len(priors), 4, generator)
    loss = criterion(num_classes=4, background=background, neg_pos=3)
    mask = labelled_class_mask([[0, 1, 2]] * 3, 4, background)
    assert mask.all()
    masked = losses_and_grads(lambda: loss((loc, conf, priors), targets, mask), loc, conf)
    plain = losses_and_grads(lambda: loss((loc, conf, priors), targets), loc, conf)
    for actual, expected in zip(masked, plain, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_background_column_is_used_whatever_the_mask_says():
    loc, conf = hand_inputs()
    zeros_at_background = torch.tensor([[False, True, True]])  # every object class declared
    a = criterion().compute((loc, conf, HAND_PRIORS), ONE_TRUTH, class_mask=zeros_at_background)
    b = criterion().compute((loc, conf, HAND_PRIORS), ONE_TRUTH)
    assert a.loss_c.item() == b.loss_c.item()


def test_labelled_class_mask_maps_labels_around_the_background_column():
    mask = labelled_class_mask([[0, 2], None, []], num_classes=4, bkg_label=1)
    assert mask.tolist() == [[True, True, False, True], [True] * 4, [False, True, False, False]]
    assert labelled_class_mask([None, None], 4) is None
    with pytest.raises(ValueError, match=r"labelled_classes\[1\]: label 3 is not an object class in \[0, 2\]"):
        labelled_class_mask([[0], [3]], num_classes=4)
    with pytest.raises(ValueError, match=r"label -1"):
        labelled_class_mask([[-1]], num_classes=4)


def test_a_box_of_an_undeclared_class_raises_naming_it():
    loc, conf = hand_inputs()
    targets = [torch.tensor([[*FAR, 0.0], [0.0, 0.0, 0.4, 0.4, 1.0]])]
    with pytest.raises(ValueError, match=r"targets\[0\]\[1\]: label 1 is not among image 0's labelled classes"):
        criterion().compute((loc, conf, HAND_PRIORS), targets, class_mask=labelled_class_mask([[0]], 3))


@pytest.mark.parametrize("mask", [torch.ones(2, 3, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool),
                                  torch.ones(1, 3)])
def test_a_mask_of_the_wrong_shape_or_dtype_raises(mask):
    loc, conf = hand_inputs()
    with pytest.raises(ValueError, match=r"class_mask must be bool \[B=1, C=3\]"):
        criterion().compute((loc, conf, HAND_PRIORS), ONE_TRUTH, class_mask=mask)


class _Linear(torch.nn.Module):
    """A tiny detector over fixed priors: images [B, 3, 8, 8] -> loc [B, P, 4], conf [B, P, C], priors."""

    def __init__(self, priors, num_classes):
        super().__init__()
        self.priors = priors
        self.num_classes = num_classes
        self.head = torch.nn.Linear(3 * 8 * 8, len(priors) * (4 + num_classes))

    def forward(self, images):
        out = self.head(images.flatten(1)).view(len(images), len(self.priors), 4 + self.num_classes)
        return out[..., :4], out[..., 4:], self.priors


def test_trainer_step_passes_the_mask_to_the_criterion():
    generator = torch.Generator().manual_seed(5)
    priors = small_priors()
    images = torch.randn(2, 3, 8, 8, generator=generator)
    targets = [torch.tensor([[0.1, 0.1, 0.5, 0.5, 0.0]]), torch.tensor([[0.3, 0.3, 0.9, 0.8, 0.0]])]
    mask = labelled_class_mask([[0], None], 4)

    def step(class_mask):
        torch.manual_seed(0)
        trainer = Trainer(_Linear(priors, 4), criterion(num_classes=4), TrainConfig(lr=0.1), "cpu")
        with torch.no_grad():
            loc, conf, _ = trainer.model(images)
            expected = trainer.criterion.compute((loc, conf, priors), targets, class_mask)
        return trainer.step(images, targets, class_mask=class_mask), expected

    masked, expected = step(mask)
    assert not masked.skipped
    assert masked.loss_c == pytest.approx(float(expected.loss_c), rel=1e-6)
    plain, expected_plain = step(None)
    assert plain.loss_c == pytest.approx(float(expected_plain.loss_c), rel=1e-6)
    assert masked.loss_c < plain.loss_c  # two of image 0's four columns left out of its softmax
