"""A paired bootstrap of mAP@0.5 over images: how far a validation set's mAP difference between two
models would move on another draw of images.

Resampling mAP@0.5 hundreds of times through torchmetrics (`evaluation.average_precision_50`) would
cost ~1 s per resample at 200 images on a CPU, so this module matches each model's detections to the
truths ONCE (COCO's greedy rule at IoU 0.5, difficult truths ignored as COCO's crowd) and then scores
every resample as weighted cumulative sums over the score-sorted detections, all resamples at once:
200 resamples of 200 images in tens of milliseconds. With all weights 1 it reproduces torchmetrics'
mAP@0.5 and per-class AP@0.5 (COCO 101-point interpolation; tested against it), so the gate takes its
point estimate from here too (`average_precisions`): 0.02 s instead of torchmetrics' 1.2 s at 200
images (benchmarks/README.md, "Online learning").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from ssd_core.data.datasets import Sample
from ssd_core.models.postprocess import Detections

__all__ = ["MatchedDetections", "average_precisions", "bootstrap_weights", "match_detections", "resampled_map_50"]

_RECALL_POINTS = torch.linspace(0, 1, 101).double()  # torchmetrics passes COCO float32 recall points
_EPS = float(torch.finfo(torch.float64).eps)  # COCO's np.spacing(1)


@dataclass(frozen=True)
class MatchedDetections:
    """Every detection of a data set, matched once.

    Attributes:
        image (Tensor[K] int64): index of the image each detection belongs to.
        label (Tensor[K] int64): 0-based class.
        score (Tensor[K] float): confidence.
        true_positive (Tensor[K] bool): matched a truth of its class at IoU >= 0.5.
        ignored (Tensor[K] bool): matched a difficult truth only: counts neither way.
        truths (Tensor[N, C] int64): non-difficult truths per image and class (C object classes).
    """

    image: Tensor
    label: Tensor
    score: Tensor
    true_positive: Tensor
    ignored: Tensor
    truths: Tensor


def _match_one(boxes: Tensor, truth: Tensor, difficult: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """COCO's greedy matching in one image and class.

    Args:
        boxes (Tensor[k, 4]) xyxy, highest score first; truth (Tensor[g, 4]) xyxy; difficult (Tensor[g] bool).

    Returns:
        true_positive (Tensor[k] bool), ignored (Tensor[k] bool).
    """
    k = boxes.shape[0]
    tp, ignored = torch.zeros(k, dtype=torch.bool), torch.zeros(k, dtype=torch.bool)
    if k == 0 or truth.shape[0] == 0:
        return tp, ignored
    iou = box_iou(boxes, truth)  # [k, g]
    if difficult.any():  # COCO's crowd IoU: intersection over the detection's area
        lt = torch.max(boxes[:, None, :2], truth[None, :, :2])  # [k, g, 2]
        rb = torch.min(boxes[:, None, 2:], truth[None, :, 2:])  # [k, g, 2]
        inter = (rb - lt).clamp(min=0).prod(dim=-1)  # [k, g]
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-12)  # [k]
        iou = torch.where(difficult[None, :], inter / area[:, None], iou)
    taken = torch.zeros(truth.shape[0], dtype=torch.bool)
    reachable = (iou >= threshold).any(dim=1).nonzero().squeeze(1).tolist()  # the rest match nothing
    for d in reachable:
        candidates = (iou[d] >= threshold) & ~(taken & ~difficult)  # a crowd truth can match again
        regular = candidates & ~difficult
        pool = regular if regular.any() else candidates
        if not pool.any():
            continue
        best = int(torch.where(pool, iou[d], -1.0).argmax())
        if difficult[best]:
            ignored[d] = True
        else:
            tp[d] = True
            taken[best] = True
    return tp, ignored


def match_detections(
    detections: Sequence[Detections], samples: Sequence[Sample], num_classes: int, threshold: float = 0.5
) -> MatchedDetections:
    """Match every image's detections to its truths, per class (see `MatchedDetections`).

    Args:
        detections: per image, pixel (x1, y1, x2, y2) boxes, scores and 0-based labels, highest score first.
        samples: the same images' truths.
        num_classes: object classes C (background not counted).
    """
    if len(detections) != len(samples):
        raise ValueError(f"got {len(detections)} detections for {len(samples)} samples")
    columns: dict[str, list[Tensor]] = {"image": [], "label": [], "score": [], "tp": [], "ignored": []}
    truths = torch.zeros(len(samples), num_classes, dtype=torch.long)  # [N, C]
    for i, (det, sample) in enumerate(zip(detections, samples, strict=True)):
        labels = sample.labels.long()
        regular = ~sample.difficult.bool()
        truths[i] = torch.bincount(labels[regular], minlength=num_classes)[:num_classes]
        for c in det.labels.unique().tolist():
            mine = det.labels == c
            order = det.scores[mine].float().argsort(descending=True, stable=True)
            boxes = det.boxes[mine].float()[order]  # [k, 4]
            in_class = labels == c
            tp, ignored = _match_one(boxes, sample.boxes[in_class].float(), sample.difficult[in_class].bool(), threshold)
            columns["image"].append(torch.full((len(order),), i, dtype=torch.long))
            columns["label"].append(torch.full((len(order),), c, dtype=torch.long))
            columns["score"].append(det.scores[mine].float()[order])
            columns["tp"].append(tp)
            columns["ignored"].append(ignored)
    cat = {name: torch.cat(parts) if parts else torch.zeros(0) for name, parts in columns.items()}
    return MatchedDetections(
        cat["image"].long(), cat["label"].long(), cat["score"].float(), cat["tp"].bool(), cat["ignored"].bool(), truths
    )


def bootstrap_weights(num_images: int, resamples: int, generator: torch.Generator) -> Tensor:
    """How often each image is drawn in each resample: Tensor[R, N] float64 (each row sums to N).
    Row 0 is all ones (the data set itself)."""
    draws = torch.randint(num_images, (resamples, num_images), generator=generator)  # [R, N]
    weights = torch.zeros(resamples, num_images, dtype=torch.float64)
    weights.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    weights[0] = 1.0
    return weights


def resampled_map_50(matched: MatchedDetections, weights: Tensor) -> Tensor:
    """mAP@0.5 of each resample.

    Args:
        matched: from `match_detections`.
        weights (Tensor[R, N]): image counts per resample (`bootstrap_weights`).

    Returns:
        Tensor[R] float64: mean over the classes with a truth in that resample of COCO's 101-point
        interpolated AP; NaN where no class has a truth.
    """
    return _resampled_aps(matched, weights).nanmean(dim=1)


def average_precisions(matched: MatchedDetections) -> tuple[float, dict[int, float]]:
    """mAP@0.5 and AP@0.5 per class of the data set itself, as `evaluation.average_precision_50` gives them.

    Returns:
        (mAP@0.5 (-1.0 without truths), {0-based label: AP@0.5} for every class with a truth or a
        detection; -1.0 for a class without truths).
    """
    aps = _resampled_aps(matched, torch.ones(1, matched.truths.shape[0], dtype=torch.float64))[0]  # [C]
    present = (matched.truths.sum(dim=0) > 0) | torch.isin(torch.arange(len(aps)), matched.label)  # [C]
    per_class = {c: float(aps[c]) if not aps[c].isnan() else -1.0 for c in present.nonzero().squeeze(1).tolist()}
    return (float(aps.nanmean()) if not aps.isnan().all() else -1.0), per_class


def _resampled_aps(matched: MatchedDetections, weights: Tensor) -> Tensor:
    """AP@0.5 per resample and class: Tensor[R, C] float64, NaN where the class has no truth in the resample."""
    num_classes = matched.truths.shape[1]
    aps = torch.full((weights.shape[0], num_classes), float("nan"), dtype=torch.float64)  # [R, C]
    positives = weights @ matched.truths.double()  # [R, C]
    for c in range(num_classes):
        mine = (matched.label == c).nonzero().squeeze(1)
        # COCO concatenates images in order, then sorts by score (stable)
        mine = mine[torch.argsort(matched.image[mine], stable=True)]
        mine = mine[torch.argsort(matched.score[mine], descending=True, stable=True)]  # [K]
        w = weights[:, matched.image[mine]]  # [R, K]
        counted = (~matched.ignored[mine]).double()  # [K]
        tp = (w * (matched.true_positive[mine].double() * counted)).cumsum(dim=1)  # [R, K]
        fp = (w * ((~matched.true_positive[mine]).double() * counted)).cumsum(dim=1)  # [R, K]
        npos = positives[:, c : c + 1]  # [R, 1]
        if mine.numel() == 0:
            aps[:, c] = torch.where(npos[:, 0] > 0, 0.0, float("nan"))
            continue
        recall = tp / npos.clamp(min=_EPS)  # [R, K]
        precision = tp / (tp + fp + _EPS)  # [R, K]
        envelope = precision.flip(1).cummax(dim=1).values.flip(1)  # [R, K] best precision at >= this recall
        index = torch.searchsorted(recall.contiguous(), _RECALL_POINTS.expand(len(recall), -1).contiguous())  # [R, 101]
        reached = index < recall.shape[1]
        sampled = torch.where(reached, envelope.gather(1, index.clamp(max=recall.shape[1] - 1)), 0.0)  # [R, 101]
        aps[:, c] = torch.where(npos[:, 0] > 0, sampled.mean(dim=1), float("nan"))
    return aps
