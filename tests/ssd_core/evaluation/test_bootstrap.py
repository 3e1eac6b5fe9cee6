"""The paired bootstrap's mAP@0.5: all-ones weights reproduce torchmetrics (overall and per class);
resampling is a real resample."""

from __future__ import annotations

import pytest
import torch

from ssd_core.data.datasets import Sample
from ssd_core.evaluation.bootstrap import (
    average_precisions,
    bootstrap_weights,
    match_detections,
    resampled_map_50,
)
from ssd_core.evaluation.mean_ap import average_precision_50
from ssd_core.models.postprocess import Detections


def _random_case(seed: int, images: int = 12, classes: int = 3, difficult_rate: float = 0.0):
    """Truths and noisy detections (jittered truths, label flips, spurious boxes) on 100 x 100 images."""
    g = torch.Generator().manual_seed(seed)
    samples, detections = [], []
    for _ in range(images):
        n = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 60
        boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 30], dim=1)  # [n, 4]
        labels = torch.randint(classes, (n,), generator=g)
        difficult = torch.rand(n, generator=g) < difficult_rate
        samples.append(Sample(torch.zeros(3, 100, 100, dtype=torch.uint8), boxes, labels, difficult))
        extra = int(torch.randint(0, 4, (1,), generator=g))
        xy2 = torch.rand(extra, 2, generator=g) * 60
        det_boxes = torch.cat([boxes + torch.randn(n, 4, generator=g) * 4,
                               torch.cat([xy2, xy2 + 20], dim=1)]).clamp(0, 100)
        det_labels = torch.cat([torch.where(torch.rand(n, generator=g) < 0.2, (labels + 1) % classes, labels),
                                torch.randint(classes, (extra,), generator=g)])
        scores = torch.rand(n + extra, generator=g)
        order = scores.argsort(descending=True)
        detections.append(Detections(det_boxes[order], scores[order], det_labels[order]))
    return detections, samples


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("difficult_rate", [0.0, 0.3])
def test_unit_weights_reproduce_torchmetrics(seed, difficult_rate):
    detections, samples = _random_case(seed, difficult_rate=difficult_rate)
    expected, _ = average_precision_50(detections, samples)
    matched = match_detections(detections, samples, num_classes=3)
    got = resampled_map_50(matched, torch.ones(1, len(samples), dtype=torch.float64))
    assert float(got[0]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("difficult_rate", [0.0, 0.3])
def test_average_precisions_equal_torchmetrics_per_class(seed, difficult_rate):
    detections, samples = _random_case(seed, difficult_rate=difficult_rate)
    expected_map, expected = average_precision_50(detections, samples)
    got_map, got = average_precisions(match_detections(detections, samples, num_classes=3))
    assert got_map == pytest.approx(expected_map, abs=1e-6)
    assert set(got) == set(expected)
    for label, ap in expected.items():
        assert got[label] == pytest.approx(ap, abs=1e-6), label


def test_average_precisions_of_a_class_without_truths_or_without_detections():
    """Class 2 is only detected (AP -1, as torchmetrics), class 1 only true (AP 0); no truths at all: -1."""
    image = torch.zeros(3, 50, 50, dtype=torch.uint8)
    samples = [Sample(image, torch.tensor([[0.0, 0, 20, 20], [25, 25, 45, 45]]), torch.tensor([0, 1]),
                      torch.zeros(2, dtype=torch.bool))]
    detections = [Detections(torch.tensor([[0.0, 0, 20, 20], [25, 25, 45, 45]]), torch.tensor([0.9, 0.8]),
                             torch.tensor([0, 2]))]
    expected_map, expected = average_precision_50(detections, samples)
    got_map, got = average_precisions(match_detections(detections, samples, num_classes=3))
    assert got == pytest.approx(expected) == {0: 1.0, 1: 0.0, 2: -1.0}
    assert got_map == pytest.approx(expected_map) == 0.5
    empty = [Sample(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))]
    assert average_precisions(match_detections([Detections(torch.zeros(0, 4), torch.zeros(0),
                                                            torch.zeros(0, dtype=torch.long))], empty, 3)) == (-1.0, {})


def test_weights_equal_an_explicitly_resampled_data_set():
    """Weight 0 drops an image: the same as scoring the data set without it (slow reference: torchmetrics)."""
    detections, samples = _random_case(7)
    keep = [i for i in range(len(samples)) if i % 3 != 0]
    weights = torch.zeros(1, len(samples), dtype=torch.float64)
    weights[0, keep] = 1.0
    expected, _ = average_precision_50([detections[i] for i in keep], [samples[i] for i in keep])
    got = resampled_map_50(match_detections(detections, samples, 3), weights)
    assert float(got[0]) == pytest.approx(expected, abs=1e-6)


def test_bootstrap_weights_are_draws_with_replacement():
    weights = bootstrap_weights(10, 500, torch.Generator().manual_seed(0))
    assert weights.shape == (500, 10) and torch.all(weights.sum(dim=1) == 10)
    assert torch.all(weights[0] == 1)
    assert weights[1:].mean().item() == pytest.approx(1.0, abs=0.05)
    assert (weights[1:] == 0).double().mean().item() == pytest.approx((0.9) ** 10, abs=0.03)  # P(not drawn)


def test_resampled_maps_spread_around_the_point_estimate():
    detections, samples = _random_case(3, images=30)
    matched = match_detections(detections, samples, 3)
    maps = resampled_map_50(matched, bootstrap_weights(30, 300, torch.Generator().manual_seed(1)))
    assert maps.shape == (300,) and 0.0 < float(maps.std()) < 0.2
    assert float(maps.mean()) == pytest.approx(float(maps[0]), abs=0.05)


def test_mismatched_lengths_raise():
    detections, samples = _random_case(0)
    with pytest.raises(ValueError, match="got 11 detections for 12 samples"):
        match_detections(detections[:-1], samples, 3)
