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
    ReferenceLine,
    ValidationScore,
    combine_scores,
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
    served, _ = _case(12, damage=0.0)

    def scored(map_50: float) -> ValidationScore:
        return ValidationScore(map_50, 1.0, {}, served.matched)

    line = ReferenceLine()
    assert line.reference(3, scored(0.50), "d1")[0] == 3  # a new line starts at the served version
    line.published(4, scored(0.49), "d1")  # a little worse: published, but not the reference
    assert line.reference(4, scored(0.49), "d1")[0] == 3
    line.published(5, scored(0.52), "d1")
    assert line.reference(5, scored(0.52), "d1")[0] == 5
    assert line.reference(5, scored(0.40), "d2")[0] == 5  # another validation set: a new line
    assert line.reference(2, scored(0.10), "d2")[0] == 2  # a rollback to a version outside the line
