"""The publish gate (ssd_core.online.gate) on hand-made cases: scores, the decision and its margin, the reference line."""

from __future__ import annotations

import pytest
import torch

from ssd_core.data.datasets import Sample, collate
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.evaluation.bootstrap import match_detections
from ssd_core.loss.multibox import MultiBoxLoss
from ssd_core.models import build_model
from ssd_core.models.postprocess import Detections
from ssd_core.online.gate import (
    GateConfig,
    ImageScore,
    ReferenceLine,
    ValidationScore,
    combine_scores,
    compare_images,
    decide,
    per_image_scores,
    score_model,
)


def _score(samples: list[Sample], detections: list[Detections]) -> ValidationScore:
    from ssd_core.evaluation.mean_ap import average_precision_50

    map_50, per_class = average_precision_50(detections, samples)
    return ValidationScore(map_50, 1.0, per_class, match_detections(detections, samples, 3))


def _case(images: int, damage: float, seed: int = 0) -> tuple[ValidationScore, ValidationScore]:
    """Served: detections = truths with small jitter; candidate: a fraction `damage` of images wrongly labelled."""
    g = torch.Generator().manual_seed(seed)
    samples, good, bad = [], [], []
    for i in range(images):
        boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 95.0]])
        labels = torch.tensor([i % 3, (i + 1) % 3])
        samples.append(Sample(torch.zeros(3, 100, 100, dtype=torch.uint8), boxes, labels, torch.zeros(2, dtype=torch.bool)))
        jitter = boxes + torch.randn(2, 4, generator=g)
        scores = torch.tensor([0.9, 0.8])
        good.append(Detections(jitter, scores, labels))
        wrong = torch.rand(1, generator=g).item() < damage
        bad.append(Detections(jitter, scores, (labels + 1) % 3 if wrong else labels))
    return _score(samples, good), _score(samples, bad)


def test_gate_publishes_an_equal_candidate_and_rejects_a_damaged_one():
    config = GateConfig(tolerance=0.02, noise_z=2.0, min_images=10, resamples=100)
    served, same = _case(40, damage=0.0)
    assert decide(served, same, 40, config).decision == "published"
    served, damaged = _case(40, damage=0.6)
    decision = decide(served, damaged, 40, config)
    assert decision.decision == "rejected" and decision.delta < -decision.margin
    assert "below the reference version's" in decision.reason and decision.margin >= 0.02


def test_gate_margin_widens_with_noise_of_a_small_set():
    config = GateConfig(tolerance=0.0, noise_z=2.0, min_images=5, resamples=200)
    small = decide(*_case(10, damage=0.2, seed=1), 10, config)
    large = decide(*_case(200, damage=0.2, seed=1), 200, config)
    assert small.noise > large.noise > 0
    assert GateConfig(resamples=0).min_images == 10 and decide(*_case(12, 0.2), 12, GateConfig(resamples=0)).noise == 0


def test_gate_is_ungated_below_min_images():
    served, damaged = _case(9, damage=1.0)
    decision = decide(served, damaged, 9, GateConfig(min_images=10))
    assert decision.decision == "ungated" and "9 validation images" in decision.reason


def test_score_model_reports_map_loss_and_leaves_the_mode():
    torch.manual_seed(0)
    model = build_model("ssd-small", 4)
    model.train()
    samples = [ShapesDataset(4, image_size=64, seed=1)[i] for i in range(4)]
    criterion = MultiBoxLoss.ssd_pytorch(4)
    score = score_model(model, samples, criterion, num_classes=3, batch_size=3)
    assert model.training
    assert 0.0 <= score.map_50 <= 1.0 and score.loss > 0
    assert set(score.per_class) <= {0, 1, 2} and score.matched.truths.shape == (4, 3)
    with pytest.raises(ValueError, match="empty validation set"):
        score_model(model, [], criterion, num_classes=3)


def test_a_score_combined_from_parts_scored_apart_equals_the_whole_sets():
    """Per-image parts do not depend on the batch they ran in: the set scored at once (the slow reference:
    one batch, the loss as MultiBoxLoss over it) equals parts scored in other batches, in pieces."""
    torch.manual_seed(0)
    model = build_model("ssd-small", 4).eval()
    samples = [ShapesDataset(7, image_size=64, seed=2)[i] for i in range(7)]
    criterion = MultiBoxLoss.ssd_pytorch(4)
    whole = score_model(model, samples, criterion, num_classes=3, batch_size=7)
    parts = (per_image_scores(model, samples[:3], criterion, batch_size=2)
             + per_image_scores(model, samples[3:], criterion))
    combined = combine_scores(parts, samples, 3)
    assert combined.map_50 == pytest.approx(whole.map_50, abs=1e-6) and combined.per_class == pytest.approx(whole.per_class)
    assert combined.loss == pytest.approx(whole.loss, rel=1e-5)
    images, targets = collate(samples, model.spec)
    with torch.no_grad():
        loss_l, loss_c = criterion(model(images), targets)
    assert whole.loss == pytest.approx(float(loss_l + loss_c), rel=1e-5)


def test_reference_line_keeps_the_best_published_version_so_losses_cannot_add_up():
    line = ReferenceLine()
    assert line.reference(3) == 3  # a new line starts at the served version
    line.published(4, better=False)  # a little worse: published, but not the reference
    assert line.reference(4) == 3
    line.published(5, better=True)
    assert line.reference(5) == 5
    assert line.reference(2) == 2 and line.versions == {2}  # a rollback to a version outside the line


def test_reference_line_survives_the_validation_sets_growth():
    """Nothing about the validation set restarts the line: a candidate after the set grew is still judged
    against the line's best, not against the (worse) version served (the caller scores the reference on the
    new images; app.online.gatekeeper's test shows it)."""
    line = ReferenceLine()
    line.reference(1)
    line.published(2, better=False)
    for served in (2, 3, 4):  # three jobs, each growing the set, each published a little worse
        assert line.reference(served) == 1
        line.published(served + 1, better=False)
    assert line.reference(5) == 1


def _images(losses: list[float], detections: list[Detections]) -> list[ImageScore]:
    return [ImageScore(d, loss, 0.0, 1) for loss, d in zip(losses, detections, strict=True)]


def _paired_case(images: int, damaged: bool, seed: int = 0):
    """Images of two objects; the reference detects both at a loss ~1; a damaged candidate (a shifted-box job:
    a little worse everywhere) scores a 25% higher loss on every image and misplaces one object on every third
    image, a real drop (mAP@0.5 -0.17) that the bootstrap margin of a dozen images does not see."""
    g = torch.Generator().manual_seed(seed)
    samples, reference, candidate, before, after = [], [], [], [], []
    for i in range(images):
        boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 95.0]])
        labels = torch.tensor([i % 3, (i + 1) % 3])
        samples.append(Sample(torch.zeros(3, 100, 100, dtype=torch.uint8), boxes, labels, torch.zeros(2, dtype=torch.bool)))
        jitter = boxes + torch.randn(2, 4, generator=g)
        reference.append(Detections(jitter, torch.tensor([0.9, 0.8]), labels))
        shift = torch.zeros(2, 4)
        if damaged and i % 3 == 0:
            shift[1] = 12.0
        candidate.append(Detections(jitter + shift, torch.tensor([0.9, 0.8]), labels))
        loss = 1.0 + 0.3 * torch.rand(1, generator=g).item()
        before.append(loss)
        after.append(loss * (1.25 if damaged else 1.0))
    ref_images, cand_images = _images(before, reference), _images(after, candidate)
    return (samples, ref_images, cand_images, combine_scores(ref_images, samples, 3),
            combine_scores(cand_images, samples, 3))


def test_paired_comparison_rejects_a_damaged_candidate_at_12_images_and_passes_an_equal_one():
    config = GateConfig(min_images=10, resamples=200)
    _, ref_images, _, reference, _ = _paired_case(12, damaged=False)
    equal = compare_images(ref_images, ref_images, reference.matched, reference.matched, config)
    assert equal.loss_increase == 0 and equal.quality_change == 0
    assert decide(reference, reference, 12, config, equal).decision == "published"
    _, ref_images, cand_images, reference, damaged = _paired_case(12, damaged=True)
    paired = compare_images(ref_images, cand_images, reference.matched, damaged.matched, config)
    assert paired.loss_bound > config.loss_tolerance * paired.loss_reference
    assert paired.quality_change == pytest.approx(-1 / 6)  # AP 1 -> 0.5 (a false positive above a truth), 4 of 12
    by_map = decide(reference, damaged, 12, config)  # the bootstrap margin alone: too wide at 12 images
    assert by_map.decision == "published" and by_map.delta < -0.1, by_map
    decision = decide(reference, damaged, 12, config, paired)
    assert decision.decision == "rejected" and "per-image validation loss rose" in decision.reason
    # the detection test alone catches it too (the loss test switched off), at 1 paired SE
    no_loss = GateConfig(min_images=10, resamples=200, loss_tolerance=1e9, paired_z=1.0)
    paired = compare_images(ref_images, cand_images, reference.matched, damaged.matched, no_loss)
    decision = decide(reference, damaged, 12, no_loss, paired)
    assert decision.decision == "rejected" and "per-image average precision fell" in decision.reason


def test_paired_quality_is_each_images_own_average_precision():
    """The slow reference: per image, by hand."""
    samples, ref_images, _, reference, _ = _paired_case(3, damaged=False)
    # image 1: both boxes moved off their objects (AP 1 -> 0); image 2: a confident false positive ranked first
    # (AP 1 -> (1/2 + 2/3) / 2); a false positive ranked last changes nothing (image 0)
    detections = [image.detections for image in ref_images]
    spurious = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    worse = [
        Detections(torch.cat([detections[0].boxes, spurious]), torch.tensor([0.9, 0.8, 0.1]),
                   torch.cat([detections[0].labels, torch.tensor([0])])),
        Detections(detections[1].boxes + 30.0, detections[1].scores, detections[1].labels),
        Detections(torch.cat([spurious, detections[2].boxes]), torch.tensor([0.95, 0.9, 0.8]),
                   torch.cat([torch.tensor([0]), detections[2].labels])),
    ]
    cand_images = [ImageScore(d, 1.0, 0.0, 1) for d in worse]
    candidate = combine_scores(cand_images, samples, 3)
    paired = compare_images(ref_images, cand_images, reference.matched, candidate.matched, GateConfig(paired_z=0))
    expected = (0 + (0 - 1) + ((1 / 2 + 2 / 3) / 2 - 1)) / 3
    assert paired.quality_change == pytest.approx(expected) and paired.quality_bound == pytest.approx(expected)
