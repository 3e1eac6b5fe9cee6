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

The "served" side is the *reference* (`ReferenceLine`): the best version published on the same
validation set since the served version's line began, so that a run of candidates each a little
worse than the last cannot add up to more than one margin.
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
from ssd_core.models.postprocess import Detections, detect_with_spec

__all__ = [
    "GateConfig", "GateDecision", "ImageScore", "ReferenceLine", "ValidationScore", "combine_scores", "decide",
    "per_image_scores", "score_model", "ungated",
]

Decision = Literal["published", "rejected", "ungated"]


@dataclass(frozen=True)
class GateConfig:
    """tolerance: mAP@0.5 the candidate may lose before noise; noise_z: bootstrap SEs added to it;
    min_images: validation images below which the gate does not judge; resamples: bootstrap
    resamples (0: no noise term); seed: of the resampling (a decision is reproducible)."""

    tolerance: float = 0.01
    noise_z: float = 3.0
    min_images: int = 10
    resamples: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tolerance < 0 or self.noise_z < 0 or self.resamples < 0 or self.min_images < 1:
            raise ValueError(f"need tolerance, noise_z, resamples >= 0 and min_images >= 1, got {self}")

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
class GateDecision:
    """decision; delta (candidate - served mAP@0.5); noise (bootstrap SE of delta); margin (the
    tolerance actually applied: tolerance + noise_z * noise); reason (rejected or ungated)."""

    decision: Decision
    delta: float | None = None
    noise: float | None = None
    margin: float | None = None
    reason: str | None = None


class ReferenceLine:
    """The best-scoring version of the line of versions the gate published on one validation set.

    `reference(version, score, digest)` returns what a candidate is judged against: the line's best,
    while `version` (the one served now) belongs to the line and the set's digest is unchanged; else a
    new line starts at `version`. `published(version, score, digest)` extends the line.
    """

    def __init__(self) -> None:
        self._digest: str | None = None
        self._best: tuple[int, ValidationScore] | None = None
        self._versions: set[int] = set()

    def reference(self, version: int, score: ValidationScore, digest: str) -> tuple[int, ValidationScore]:
        if self._best is None or digest != self._digest or version not in self._versions:
            self._digest, self._best, self._versions = digest, (version, score), {version}
        return self._best

    def published(self, version: int, score: ValidationScore, digest: str) -> None:
        if self._best is None or digest != self._digest:
            self._digest, self._best, self._versions = digest, (version, score), {version}
            return
        self._versions.add(version)
        if score.map_50 > self._best[1].map_50:
            self._best = (version, score)


@dataclass(frozen=True)
class ImageScore:
    """One validation image's part of a model's score, independent of how images are batched: its
    detections (pixel xyxy, CPU), its MultiBoxLoss sum (loss_l + loss_c, not normalised) and positives."""

    detections: Detections
    loss_sum: float
    positives: int


@torch.no_grad()
def per_image_scores(
    model: nn.Module, samples: Sequence[Sample], criterion: LossCriterion, *, batch_size: int = 32,
    device: torch.device | str = "cpu", score_threshold: float = 0.01, max_detections: int = 100,
) -> list[ImageScore]:
    """Run `model` (eval mode, no gradients; its train/eval mode is put back) on `samples`: each image's part.

    Args:
        model: an SSD with `spec`; forward [B, 3, S, S] -> (loc [B, P, 4], conf [B, P, C], priors [P, 4]).
        samples: validation images with pixel (x1, y1, x2, y2) truths.
        criterion: the training loss (`MultiBoxLoss`); its hard negatives are mined per image, so an
            image's loss sum does not depend on the batch it is scored in.
    """
    training = model.training
    model.eval()
    scores: list[ImageScore] = []
    try:
        for start in range(0, len(samples), batch_size):
            batch = list(samples[start : start + batch_size])
            images, targets = collate(batch, model.spec)  # [b, 3, S, S], list[[n, 6]] normalised
            # channels-last input: the CPU convolutions' faster layout (-20% at ssd-small, same values to 1e-7)
            loc, conf, priors = model(images.to(device).contiguous(memory_format=torch.channels_last))
            loc, conf = loc.float(), conf.float()  # [b, P, 4], [b, P, C]
            stats = criterion.compute((loc, conf, priors), [t.to(device) for t in targets]).stats
            loss_sums = (stats.loss_l_sum + stats.loss_c_sum).tolist()  # [b]
            detections = detect_with_spec(
                model.spec, loc, conf, priors,
                score_threshold=score_threshold, max_detections=max_detections,
                image_sizes=[(s.image.shape[-2], s.image.shape[-1]) for s in batch],
            )
            scores += [ImageScore(_cpu(d), loss, positives) for d, loss, positives
                       in zip(detections, loss_sums, stats.num_positives.tolist(), strict=True)]
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


def decide(served: ValidationScore, candidate: ValidationScore, num_images: int, config: GateConfig) -> GateDecision:
    """Publish or reject `candidate` against `served`, both scored on the same `num_images` images."""
    if not config.judges(num_images):
        return ungated(num_images, config)
    if served.map_50 < 0:
        return GateDecision("ungated", reason="the validation set holds no truths to judge by")
    delta = candidate.map_50 - served.map_50
    noise = _paired_noise(served.matched, candidate.matched, num_images, config)
    margin = config.tolerance + config.noise_z * noise
    if not math.isfinite(candidate.loss):
        return GateDecision("rejected", delta, noise, margin, "the candidate's validation loss is not finite")
    if delta >= -margin:
        return GateDecision("published", delta, noise, margin)
    reason = (f"gate: validation mAP@0.5 {candidate.map_50:.4f} is {-delta:.4f} below the reference version's "
              f"{served.map_50:.4f}, more than the margin {margin:.4f} (tolerance {config.tolerance:g} + "
              f"{config.noise_z:g} x bootstrap SE {noise:.4f} over {num_images} images)")
    return GateDecision("rejected", delta, noise, margin, reason)


def _paired_noise(served: MatchedDetections, candidate: MatchedDetections, num_images: int, config: GateConfig) -> float:
    """Standard deviation of (candidate - served) mAP@0.5 over paired bootstrap resamples; 0 without resamples."""
    if config.resamples < 2:
        return 0.0
    weights = bootstrap_weights(num_images, config.resamples + 1, torch.Generator().manual_seed(config.seed))
    differences = (resampled_map_50(candidate, weights) - resampled_map_50(served, weights))[1:]  # [R]
    differences = differences[~differences.isnan()]
    return float(differences.std()) if len(differences) > 1 else 0.0
