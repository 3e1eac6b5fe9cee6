"""The publish gate: is a candidate model at least as good as the served one on the validation set?

Both models are scored on the same validation images (`score_model`): mAP@0.5 (torchmetrics' COCO
rule, computed from the bootstrap's matched detections: equal to `evaluation.average_precision_50`,
tested, at a 60th of its cost) and the MultiBoxLoss of the set. A score is combined from per-image
parts (`per_image_scores`, `combine_scores`), so a caller that keeps a model's parts scores a grown
validation set by running only the new images. The candidate is published when

    candidate mAP@0.5 >= served mAP@0.5 - (tolerance + noise_z * SE)

where SE is the standard deviation of the mAP@0.5 *difference* over `resamples` paired bootstrap
resamples of the validation images (both models scored on the same resampled images, `bootstrap`).
A small or noisy set widens the margin, so clean jobs are not rejected by chance; pairing keeps it
narrow for similar models (their errors on an image go together) and a collapsed model is far
outside it. Below `min_images` validation images the gate does not judge: `ungated`.

At 10-20 images that margin is 0.2-0.3 of mAP@0.5: a candidate could lose 0.1 per job. Two paired
per-image tests (`compare_images`) are sensitive there, because every image is its own control: the
per-image loss (per matched prior) and the per-image detection quality (the image's own average
precision: its detections ranked by score, classes pooled, from the same matched detections; a ranking
measure, so a young model's drifting confidence calibration does not move it, as a count of detections
above a fixed score would). The candidate is rejected when its loss is
significantly above (1 + `loss_tolerance`) x the reference's (the lower bound mean - `paired_z` x SE of
the per-image increases is above `loss_tolerance` x the reference's mean), or its detection quality
significantly below the reference's by more than `detection_tolerance` (the upper bound of the
per-image changes below it). An equal candidate has every difference 0 and passes; a real drop shows
on most images at once and is rejected at a dozen.

The "served" side is the *reference* (`ReferenceLine`): the best version published since the served
version's line began, scored on the validation set as it is now (the caller scores the reference
version on images added since), so that a run of candidates each a little worse than the last cannot
add up to more than one margin, whether or not the validation set grows between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ssd_core.data.datasets import Sample, collate
from ssd_core.evaluation.bootstrap import (
    MatchedDetections,
    average_precisions,
    bootstrap_weights,
    match_detections,
    resampled_map_50,
)
from ssd_core.loss.criterion import LossCriterion
from ssd_core.loss.partial_labels import labelled_class_mask
from ssd_core.models.postprocess import Detections, detect_with_spec

__all__ = [
    "GateConfig", "GateDecision", "ImageScore", "PairedComparison", "ReferenceLine", "ValidationScore",
    "combine_scores", "compare_images", "decide", "per_image_scores", "score_model", "ungated",
]

Decision = Literal["published", "rejected", "ungated"]


@dataclass(frozen=True)
class GateConfig:
    """tolerance: mAP@0.5 the candidate may lose before noise; noise_z: bootstrap SEs added to it;
    min_images: validation images below which the gate does not judge; resamples: bootstrap
    resamples (0: no noise term); seed: of the resampling (a decision is reproducible); loss_tolerance,
    detection_tolerance, paired_z: the paired per-image tests (module docstring)."""

    tolerance: float = 0.01
    noise_z: float = 3.0
    min_images: int = 10
    resamples: int = 200
    seed: int = 0
    loss_tolerance: float = 0.1
    detection_tolerance: float = 0.05
    paired_z: float = 2.0

    def __post_init__(self) -> None:
        if min(self.tolerance, self.noise_z, self.resamples, self.loss_tolerance, self.detection_tolerance,
               self.paired_z) < 0 or self.min_images < 1:
            raise ValueError(f"need tolerances, z, resamples >= 0 and min_images >= 1, got {self}")

    def judges(self, num_images: int) -> bool:
        """Whether a validation set of `num_images` is large enough to judge."""
        return num_images >= self.min_images


@dataclass(frozen=True)
class ValidationScore:
    """A model's figures on a validation set: map_50 (torchmetrics' rule; -1 without truths), loss
    (MultiBoxLoss loss_l + loss_c of the set as one batch), per_class ({0-based label: AP@0.5}) and its
    matched detections (for the bootstrap)."""

    map_50: float
    loss: float
    per_class: dict[int, float]
    matched: MatchedDetections


@dataclass(frozen=True)
class PairedComparison:
    """The paired per-image tests of a candidate against the reference on the same `images`: per-image loss
    (per matched prior) `loss_reference` (mean), `loss_increase` (mean of candidate - reference) and
    `loss_bound` (its lower bound, mean - paired_z x SE); per-image average precision change `quality_change`
    (mean of candidate - reference) and `quality_bound` (its upper bound, mean + paired_z x SE)."""

    images: int
    loss_reference: float
    loss_increase: float
    loss_bound: float
    quality_change: float
    quality_bound: float


@dataclass(frozen=True)
class GateDecision:
    """decision; delta (candidate - served mAP@0.5); noise (bootstrap SE of delta); margin (the
    tolerance actually applied: tolerance + noise_z * noise); paired (the per-image tests, None when not
    run); reason (rejected or ungated)."""

    decision: Decision
    delta: float | None = None
    noise: float | None = None
    margin: float | None = None
    reason: str | None = None
    paired: PairedComparison | None = None


class ReferenceLine:
    """The best version of the line of versions the gate published since the served version's line began.

    `reference(served)` is the version a candidate is judged against: the line's best while `served` (the
    version served now) belongs to the line, else a new line starts at `served` (a rollback, a version
    published by another path). `published(version, better)` extends the line with a version the gate
    published; `better`: it scored at least the reference's mAP@0.5 on the same images, so it becomes the
    reference. The line does not restart when the validation set changes: the caller scores the reference
    version on the set as it is (on the new images only, keeping its per-image parts).
    """

    def __init__(self) -> None:
        self._best: int | None = None
        self._versions: set[int] = set()

    def reference(self, served: int) -> int:
        if self._best is None or served not in self._versions:
            self._best, self._versions = served, {served}
        return self._best

    def published(self, version: int, better: bool) -> None:
        self._versions.add(version)
        if better or self._best is None:
            self._best = version

    @property
    def versions(self) -> frozenset[int]:
        return frozenset(self._versions)


@dataclass(frozen=True)
class ImageScore:
    """One validation image's part of a model's score, independent of how images are batched: its
    detections (pixel xyxy, CPU), its MultiBoxLoss sums (loss_l, loss_c, not normalised) and positives."""

    detections: Detections
    loss_l_sum: float
    loss_c_sum: float
    positives: int

    @property
    def loss_sum(self) -> float:
        return self.loss_l_sum + self.loss_c_sum

    @property
    def loss_per_positive(self) -> float:
        """The image's loss per matched prior (its sum when it has none)."""
        return self.loss_sum / max(1, self.positives)


@torch.no_grad()
def per_image_scores(
    model: nn.Module, samples: Sequence[Sample], criterion: LossCriterion, *, batch_size: int = 32,
    device: torch.device | str = "cpu", score_threshold: float = 0.01, max_detections: int = 100,
) -> list[ImageScore]:
    """Run `model` (eval mode, no gradients; its train/eval mode is put back) on `samples`: each image's part.

    Args:
        model: an SSD with `spec`; forward [B, 3, S, S] -> (loc [B, P, 4], conf [B, P, C], priors [P, 4]).
        samples: validation images with pixel (x1, y1, x2, y2) truths (a partially labelled image's loss
            leaves its unlabelled classes out, as in training).
        criterion: the training loss (`MultiBoxLoss`); its hard negatives are mined per image, so an
            image's loss sum does not depend on the batch it is scored in.
    """
    num_classes, background = model.spec.num_classes, getattr(criterion, "background_label", 0)
    training = model.training
    model.eval()
    scores: list[ImageScore] = []
    try:
        for start in range(0, len(samples), batch_size):
            batch = list(samples[start : start + batch_size])
            images, targets = collate(batch, model.spec)  # [b, 3, S, S], list[[n, 6]] normalised
            class_mask = labelled_class_mask([s.labelled_classes for s in batch], num_classes, background)  # [b, C]
            # channels-last input: the CPU convolutions' faster layout (-20% at ssd-small, same values to 1e-7)
            loc, conf, priors = model(images.to(device).contiguous(memory_format=torch.channels_last))
            loc, conf = loc.float(), conf.float()  # [b, P, 4], [b, P, C]
            stats = criterion.compute((loc, conf, priors), [t.to(device) for t in targets],
                                      None if class_mask is None else class_mask.to(device)).stats
            detections = detect_with_spec(
                model.spec, loc, conf, priors,
                score_threshold=score_threshold, max_detections=max_detections,
                image_sizes=[(s.image.shape[-2], s.image.shape[-1]) for s in batch],
            )
            scores += [ImageScore(_cpu(d), loss_l, loss_c, positives) for d, loss_l, loss_c, positives in zip(
                detections, stats.loss_l_sum.tolist(), stats.loss_c_sum.tolist(), stats.num_positives.tolist(),
                strict=True)]
    finally:
        model.train(training)
    return scores


def combine_scores(images: Sequence[ImageScore], samples: Sequence[Sample], num_classes: int) -> ValidationScore:
    """The validation set's score from its images' (`per_image_scores`, in `samples`' order): mAP@0.5 and
    AP per class of all detections, and the loss of the set as one batch (loss sums / total positives)."""
    if not samples:
        raise ValueError("cannot score a model on an empty validation set")
    matched = match_detections([image.detections for image in images], samples, num_classes)
    map_50, per_class = average_precisions(matched)
    loss = sum(image.loss_sum for image in images) / max(1, sum(image.positives for image in images))
    return ValidationScore(map_50, loss, per_class, matched)


def score_model(
    model: nn.Module, samples: Sequence[Sample], criterion: LossCriterion, *, num_classes: int, **options,
) -> ValidationScore:
    """`combine_scores(per_image_scores(model, samples, criterion, **options), samples, num_classes)`;
    num_classes: object classes (background not counted)."""
    return combine_scores(per_image_scores(model, samples, criterion, **options), samples, num_classes)


def _cpu(detections: Detections) -> Detections:
    return Detections(detections.boxes.cpu(), detections.scores.cpu(), detections.labels.cpu())


def ungated(num_images: int, config: GateConfig) -> GateDecision:
    """The decision for a validation set too small to judge by."""
    return GateDecision("ungated", reason=f"{num_images} validation images, the gate needs {config.min_images}")


def compare_images(
    reference: Sequence[ImageScore], candidate: Sequence[ImageScore], reference_matched: MatchedDetections,
    candidate_matched: MatchedDetections, config: GateConfig,
) -> PairedComparison:
    """The paired per-image tests (module docstring) of `candidate` against `reference`, both scored on the
    same images in the same order (their per-image parts and their matched detections)."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"need the same non-empty images on both sides, got {len(reference)} and {len(candidate)}")
    before = torch.tensor([image.loss_per_positive for image in reference], dtype=torch.float64)  # [N]
    after = torch.tensor([image.loss_per_positive for image in candidate], dtype=torch.float64)  # [N]
    increase, increase_se = _mean_and_se(after - before)
    change, change_se = _mean_and_se(_image_precisions(candidate_matched, len(candidate))
                                     - _image_precisions(reference_matched, len(reference)))
    return PairedComparison(len(reference), float(before.mean()), increase, increase - config.paired_z * increase_se,
                            change, change + config.paired_z * change_se)


def _mean_and_se(differences: torch.Tensor) -> tuple[float, float]:
    """Mean of per-image differences and its standard error (0 for one image)."""
    n = len(differences)
    se = float(differences.std() / math.sqrt(n)) if n > 1 else 0.0
    return float(differences.mean()), se


def _image_precisions(matched: MatchedDetections, num_images: int) -> torch.Tensor:
    """Per image, its own average precision: its detections ranked by score (classes pooled), the precision at
    each true positive summed over its truths; Tensor[N] float64, 0 for an image without truths. Detections
    that matched only a difficult truth count neither way."""
    precisions = torch.zeros(num_images, dtype=torch.float64)
    truths = matched.truths.sum(dim=1)  # [N]
    counted = ~matched.ignored
    for image in (truths > 0).nonzero().flatten().tolist():
        mine = counted & (matched.image == image)
        order = matched.score[mine].argsort(descending=True, stable=True)
        hits = matched.true_positive[mine][order].double()  # [k], best first
        ranks = torch.arange(1, len(hits) + 1, dtype=torch.float64)
        precisions[image] = (hits * hits.cumsum(0) / ranks).sum() / truths[image]
    return precisions


def decide(
    served: ValidationScore, candidate: ValidationScore, num_images: int, config: GateConfig,
    paired: PairedComparison | None = None,
) -> GateDecision:
    """Publish or reject `candidate` against `served` (the reference), both scored on the same `num_images`
    images; `paired`: their per-image tests (`compare_images`), None to judge by mAP@0.5 alone."""
    if not config.judges(num_images):
        return ungated(num_images, config)
    if served.map_50 < 0:
        return GateDecision("ungated", reason="the validation set holds no truths to judge by")
    delta = candidate.map_50 - served.map_50
    noise = _paired_noise(served.matched, candidate.matched, num_images, config)
    margin = config.tolerance + config.noise_z * noise

    def rejected(reason: str) -> GateDecision:
        return GateDecision("rejected", delta, noise, margin, reason, paired)

    if not math.isfinite(candidate.loss):
        return rejected("the candidate's validation loss is not finite")
    if delta < -margin:
        return rejected(f"gate: validation mAP@0.5 {candidate.map_50:.4f} is {-delta:.4f} below the reference "
                        f"version's {served.map_50:.4f}, more than the margin {margin:.4f} (tolerance "
                        f"{config.tolerance:g} + {config.noise_z:g} x bootstrap SE {noise:.4f} over {num_images} images)")
    if paired is not None and paired.loss_bound > config.loss_tolerance * paired.loss_reference:
        return rejected(f"gate: the per-image validation loss rose by {paired.loss_increase:.4f} on average over "
                        f"{paired.images} images (at least {paired.loss_bound:.4f} at {config.paired_z:g} paired SEs), "
                        f"more than {config.loss_tolerance:g} x the reference version's {paired.loss_reference:.4f}")
    if paired is not None and paired.quality_bound < -config.detection_tolerance:
        return rejected(f"gate: the per-image average precision fell by {-paired.quality_change:.4f} on average over "
                        f"{paired.images} images (at least {-paired.quality_bound:.4f} at {config.paired_z:g} paired "
                        f"SEs), more than the tolerance {config.detection_tolerance:g}")
    return GateDecision("published", delta, noise, margin, paired=paired)


def _paired_noise(served: MatchedDetections, candidate: MatchedDetections, num_images: int, config: GateConfig) -> float:
    """Standard deviation of (candidate - served) mAP@0.5 over paired bootstrap resamples; 0 without resamples."""
    if config.resamples < 2:
        return 0.0
    weights = bootstrap_weights(num_images, config.resamples + 1, torch.Generator().manual_seed(config.seed))
    differences = (resampled_map_50(candidate, weights) - resampled_map_50(served, weights))[1:]  # [R]
    differences = differences[~differences.isnan()]
    return float(differences.std()) if len(differences) > 1 else 0.0
