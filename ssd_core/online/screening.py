"""Screening a fine-tune job's images before its first step, against the served model as it is now.

Each incoming image is judged by the served model's loss on it against the same model's loss on
clean data *now*: its per-image losses on the validation set (which the gate keeps per version
anyway). Both are taken per matched prior (an image's loss sums over its positives), separately for
localisation (`loss_l`: boxes in the wrong place or coordinates) and classification (`loss_c`: labels
off by one, classes swapped). An image is a loss outlier when either part exceeds `loss_ratio` x the
validation set's median of that part and that median + `loss_floor` (a model near-perfect on its
validation images has medians near 0, where a ratio alone would call ordinary variation an outlier: the
demo model's medians are 0.25 (loc) and 0.95 (conf) per matched prior, and on 768 clean `ShapesDataset`
images its 99th percentiles stand 0.7 and 1.7 above them, with single images of small or touching objects
up to 1.2 and 5.3: the loss rules quarantined 2 of them with a floor of 3, 6 with a floor of 1, while the
images with moved or rescaled boxes that the label checks miss stand 2-6 (loc) and 6-13 (conf) above).
A baseline from the present model cannot go stale while the model learns fast, which is exactly when a
deployment is young. The job as a whole is judged the same way, by the loss part that three quarters of its
images reach (its lower quartile): when that exceeds `job_ratio` x the validation median and that median +
`job_floor`, the job is rejected (the floor again for a competent model's near-0 medians: a clean 16-image
job on the demo model reached 2.02 x a median of 0.157 from 4 validation images, 0.16 above it). A broken
pipeline corrupts a whole job, and a young model's loss on each corrupted image may rise only 2-3 x, below
the per-image limit; every image of such a job rises. A clean job instead holds images the model has not
learnt yet beside easy ones: learning from fresh (`bench_fresh.py`, mAP@0.5 near 0.6), clean 8-image jobs
reached a *median* of 2.1-2.6 x, which the median rule rejected in every run, while their lower quartiles
stood at 0.9-1.4 x; shifted and wrongly scaled 16-image jobs on the same model stand at 3.6-5.2 x (lower
quartile). A job whose corruption hits only some images is left to the per-image rules and the gate.

Screening stays quiet until the served model is *competent*: validation mAP@0.5 >= `min_map` on at
least `min_images` validation images (a near-random model's losses are high everywhere and tell clean
from corrupt images apart poorly). Once it reaches `label_min_map` on `label_min_images`, each box is
also checked against the model's confident detections (`ssd_core.online.label_quality`).

An image with a loss outlier or a strong label disagreement is *quarantined*: not trained on and kept
out of the validation set and the replay memory (the caller's part). A job in which more than
`reject_share` of the images are quarantined is rejected as a whole: the pipeline that sent it is
likely broken. `force` trains every image anyway (the publish gate still judges the result).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from ssd_core.data.datasets import Sample
from ssd_core.models.postprocess import Detections
from ssd_core.online.label_quality import BoxIssue, LabelCheckConfig, check_labels, disagreement

__all__ = ["Competence", "ImageLoss", "ScreeningConfig", "ScreeningVerdict", "lower_quartile", "screen_batch"]

BOX_HINT = ("boxes in the wrong place or coordinates? (normalised instead of pixels, (x, y, w, h) instead of "
            "(x1, y1, x2, y2), shifted or scaled by another image size)")
LABEL_HINT = ("labels in another class order or off by one? (labels are 0-based object classes, background not "
              "counted)")
UNLABELLED_HINT = "objects left unlabelled? (declare `labelled_classes` for partial labels)"
_HINTS = {"loc_loss": BOX_HINT, "bad_location": BOX_HINT, "conf_loss": LABEL_HINT, "swapped_label": LABEL_HINT,
          "overlooked_object": UNLABELLED_HINT}


@dataclass(frozen=True)
class ScreeningConfig:
    """loss_ratio: the most an image's loss part may reach, in medians of the validation set's; loss_floor: and
    at least this above the median (per matched prior); job_ratio: the most the lower quartile of a job's images
    (the loss three quarters of them reach) may reach, in validation medians; job_floor: and at least this above
    them; min_images, min_map: competence for loss screening; label_min_images, label_min_map: for the label
    checks (`labels`); reject_share: quarantined share of a job's images that rejects the job."""

    loss_ratio: float = 3.0
    loss_floor: float = 3.0
    job_ratio: float = 2.0
    job_floor: float = 0.5
    min_images: int = 4
    min_map: float = 0.2
    label_min_images: int = 8
    label_min_map: float = 0.7
    reject_share: float = 0.5
    labels: LabelCheckConfig = field(default_factory=LabelCheckConfig)

    def __post_init__(self) -> None:
        if not (self.loss_ratio > 1 and self.job_ratio > 1) or self.loss_floor < 0 or self.job_floor < 0:
            raise ValueError(f"need loss_ratio, job_ratio > 1 and loss_floor, job_floor >= 0, got {self}")
        if self.min_images < 1 or self.label_min_images < 1 or not 0 < self.reject_share <= 1:
            raise ValueError(f"need min_images, label_min_images >= 1 and reject_share in (0, 1], got {self}")


@dataclass(frozen=True)
class ImageLoss:
    """An image's loss under the served model, per matched prior: loc and conf (MultiBoxLoss sums over the
    image / its positives); positives: matched priors (0: no box, nothing to compare)."""

    loss_l: float
    loss_c: float
    positives: int

    @classmethod
    def from_sums(cls, loss_l_sum: float, loss_c_sum: float, positives: int) -> ImageLoss:
        return cls(loss_l_sum / max(1, positives), loss_c_sum / max(1, positives), positives)


@dataclass(frozen=True)
class Competence:
    """The served model on the validation set now: `images` (with a box) and its mAP@0.5 (-1: unknown)."""

    images: int
    map_50: float

    def reaches(self, images: int, map_50: float) -> bool:
        return self.images >= images and self.map_50 >= map_50


@dataclass(frozen=True)
class ScreeningVerdict:
    """losses_checked, labels_checked: which checks ran (quiet: `quiet_reason` says why not); the loss
    baselines (validation medians) and thresholds (None while quiet); `issues` per image index (only images
    with any); `quarantined` image indices; `reason` when the job is rejected as a whole."""

    losses_checked: bool
    labels_checked: bool
    quiet_reason: str | None = None
    baseline_l: float | None = None
    baseline_c: float | None = None
    threshold_l: float | None = None
    threshold_c: float | None = None
    issues: dict[int, list[BoxIssue]] = field(default_factory=dict)
    quarantined: tuple[int, ...] = ()
    reason: str | None = None

    def stops(self, force: bool) -> bool:
        """Whether the job ends here, rejected (unless its client forces it past)."""
        return self.reason is not None and not force


def screen_batch(
    samples: Sequence[Sample], losses: Sequence[ImageLoss], detections: Sequence[Detections],
    validation: Sequence[ImageLoss], competence: Competence, config: ScreeningConfig,
) -> ScreeningVerdict:
    """Judge a job's images.

    Args:
        samples: the job's images with their annotations (pixel xyxy).
        losses, detections: the served model's loss and detections (pixel xyxy) on each of them.
        validation: the same model's per-image losses on the validation set (images without a box are
            left out of the baselines).
        competence: the same model's standing on the validation set.
    """
    if not len(samples) == len(losses) == len(detections):
        raise ValueError(f"got {len(samples)} samples, {len(losses)} losses and {len(detections)} detections")
    broken = [i for i, loss in enumerate(losses) if not math.isfinite(loss.loss_l + loss.loss_c)]
    if broken:  # no model, competent or not, says anything useful about such a batch: reject it now
        return ScreeningVerdict(False, False, issues={i: [BoxIssue(None, "loc_loss", value=math.nan)] for i in broken},
                                quarantined=tuple(broken),
                                reason=f"screening: the served model's loss on images {broken} is not finite")
    scored = [loss for loss in validation if loss.positives > 0]
    if not competence.reaches(config.min_images, config.min_map) or len(scored) < config.min_images:
        return ScreeningVerdict(False, False, quiet_reason=(
            f"the served model is not yet competent on the validation set: mAP@0.5 {competence.map_50:.3f} on "
            f"{competence.images} images, screening needs >= {config.min_map:g} on >= {config.min_images}"))
    baseline_l = statistics.median(loss.loss_l for loss in scored)
    baseline_c = statistics.median(loss.loss_c for loss in scored)
    threshold_l = max(config.loss_ratio * baseline_l, baseline_l + config.loss_floor)
    threshold_c = max(config.loss_ratio * baseline_c, baseline_c + config.loss_floor)
    labels_checked = competence.reaches(config.label_min_images, config.label_min_map)
    issues: dict[int, list[BoxIssue]] = {}
    quarantined = []
    for i, (sample, loss, found) in enumerate(zip(samples, losses, detections, strict=True)):
        outliers = []
        if loss.positives and loss.loss_l > threshold_l:
            outliers.append(BoxIssue(None, "loc_loss", value=loss.loss_l, threshold=threshold_l))
        if loss.positives and loss.loss_c > threshold_c:
            outliers.append(BoxIssue(None, "conf_loss", value=loss.loss_c, threshold=threshold_c))
        box_issues = check_labels(sample, found, config.labels) if labels_checked else []
        if outliers or box_issues:
            issues[i] = outliers + box_issues
        if outliers or (box_issues and disagreement(box_issues, len(sample.boxes)) >= config.labels.quarantine_share):
            quarantined.append(i)
    reason = _job_outlier(losses, baseline_l, baseline_c, config)
    if reason is None and len(quarantined) > config.reject_share * len(samples):
        kinds = Counter(issue.kind for i in quarantined for issue in issues[i])
        listed = ", ".join(f"{kind} x {count}" for kind, count in kinds.most_common())
        reason = (f"screening: {len(quarantined)} of {len(samples)} images quarantined, more than "
                  f"{config.reject_share:g} of the job ({listed}; baselines from the served model on the validation "
                  f"set now: loss_l {baseline_l:.3f}, loss_c {baseline_c:.3f} per matched prior); "
                  f"{_HINTS[kinds.most_common(1)[0][0]]} Send \"force\": true to train them anyway (the gate still "
                  f"applies)")
    return ScreeningVerdict(True, labels_checked, None, baseline_l, baseline_c, threshold_l, threshold_c, issues,
                            tuple(quarantined), reason)


def _job_outlier(losses: Sequence[ImageLoss], baseline_l: float, baseline_c: float, config: ScreeningConfig) -> str | None:
    """Why the job as a whole is an outlier (the loss part three quarters of its images reach above `job_ratio` x
    the validation median and that median + `job_floor`), or None."""
    scored = [loss for loss in losses if loss.positives > 0]
    if not scored:
        return None
    for part, baseline, hint in (("loss_l", baseline_l, BOX_HINT), ("loss_c", baseline_c, LABEL_HINT)):
        reached = lower_quartile([getattr(loss, part) for loss in scored])
        if reached > max(config.job_ratio * baseline, baseline + config.job_floor):
            return (f"screening: three quarters of the job's {len(scored)} images have a served-model {part} per "
                    f"matched prior of at least {reached:.3f}, {reached / max(baseline, 1e-12):.2f} x its median "
                    f"{baseline:.3f} on the validation set now (the most a whole job may reach: {config.job_ratio:g} "
                    f"x); {hint} Send \"force\": true to train them anyway (the gate still applies)")
    return None


def lower_quartile(values: Sequence[float]) -> float:
    """The largest value that at least three quarters of `values` reach (the (n // 4)-th smallest, 0-based)."""
    if not values:
        raise ValueError("lower_quartile of no values")
    return sorted(values)[len(values) // 4]
