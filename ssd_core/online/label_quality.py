"""Label-quality checks per box: where a competent served model confidently contradicts an annotation.

For one image, its annotated boxes are compared with the served model's *confident* detections
(score >= `confidence`):

- `swapped_label`: no confident detection of the box's class overlaps it at IoU >= `match_iou`, but
  one of another class does (the label names another class than the object's);
- `bad_location`: no confident detection of any class overlaps the box at IoU >= `match_iou`, but a
  confident detection of its class overlaps it at all (0 < IoU) and overlaps no other box of that
  class at `match_iou` (the box is beside its object: shifted, scaled, in other coordinates). Each
  detection is the place of at most one moved box, the one it overlaps most (a detection spanning two
  touching boxes of its class is the model merging two objects, not two boxes moved);
- `overlooked_object`: a confident detection overlaps no annotated box at IoU >= `match_iou` and is no
  moved box's place (an object left unlabelled). A class an image declares unlabelled
  (`labelled_classes`) is not checked.

A box no confident detection comes near is not an issue: the model is unsure, not contradicting.
The image's disagreement is its issues over its boxes (`issues / max(1, boxes)`); it is quarantined
when the disagreement reaches `quarantine_share`, so one spurious detection beside several confirmed
boxes does not quarantine an image, and a batch of shifted boxes (every box an issue) does.
These checks are only as good as the model: the caller applies them once the served model is
competent on the validation set (`ssd_core.online.screening`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torchvision.ops import box_iou

from ssd_core.data.datasets import Sample
from ssd_core.models.postprocess import Detections

__all__ = ["BoxIssue", "LabelCheckConfig", "check_labels", "disagreement"]

IssueKind = Literal["swapped_label", "bad_location", "overlooked_object", "loc_loss", "conf_loss"]


@dataclass(frozen=True)
class LabelCheckConfig:
    """confidence: a detection's score that counts as the model's opinion; match_iou: the IoU at which a
    detection confirms a box; quarantine_share: issues per box that quarantine an image."""

    confidence: float = 0.9
    match_iou: float = 0.5
    quarantine_share: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.confidence < 1 and 0 < self.match_iou < 1 and self.quarantine_share > 0):
            raise ValueError(f"need confidence and match_iou in (0, 1) and quarantine_share > 0, got {self}")


@dataclass(frozen=True)
class BoxIssue:
    """One disagreement: `box` (index of the annotated box; None for an overlooked object or an image-wide
    loss), `kind`, and the model's detection behind it (pixel xyxy `model_box`, 0-based `model_label`,
    `model_score`; None for a loss outlier, whose `value` and `threshold` are the loss and its limit)."""

    box: int | None
    kind: IssueKind
    model_box: tuple[float, float, float, float] | None = None
    model_label: int | None = None
    model_score: float | None = None
    value: float | None = None
    threshold: float | None = None


def check_labels(sample: Sample, detections: Detections, config: LabelCheckConfig) -> list[BoxIssue]:
    """The issues of `sample`'s annotation against the served model's `detections` (pixel xyxy) on it."""
    confident = detections.scores >= config.confidence
    boxes, scores, labels = detections.boxes[confident].float(), detections.scores[confident], detections.labels[confident]
    truths, truth_labels = sample.boxes.float(), sample.labels.long()
    if len(boxes) == 0:
        return []
    iou = box_iou(truths, boxes)  # [N, K]
    same_class = truth_labels[:, None] == labels[None, :]  # [N, K]
    confirms = iou >= config.match_iou
    unconfirmed = ~(confirms & same_class).any(dim=1)  # [N]
    # a confident box of its class overlapping a box no detection covers, which is no other same-class box's detection
    moved = (iou > 0) & same_class & ~confirms.any(dim=1, keepdim=True) & ~(confirms & same_class).any(dim=0)  # [N, K]
    if len(truths):
        # each detection is the true place of at most one moved box (the one it overlaps most): a detection
        # spanning two neighbouring boxes of its class is the model merging them, not two boxes moved
        closest = torch.where(moved, iou, -1.0).argmax(dim=0)  # [K]
        moved &= torch.arange(len(truths))[:, None] == closest[None, :]
    issues: list[BoxIssue] = []
    explained = torch.zeros(len(boxes), dtype=torch.bool)  # [K]
    for i in range(len(truths)):
        if not unconfirmed[i]:
            continue
        if confirms[i].any():  # confidently another class in the box's place
            k = int(torch.where(confirms[i], scores, -1.0).argmax())
            issues.append(_issue(i, "swapped_label", boxes, labels, scores, k))
        elif moved[i].any():
            k = int(torch.where(moved[i], scores, -1.0).argmax())
            issues.append(_issue(i, "bad_location", boxes, labels, scores, k))
            explained[k] = True  # the moved box's object: not also an overlooked one
    checked = _checked_classes(sample, labels)
    unexplained = ~confirms.any(dim=0) & ~explained & checked  # [K]
    for k in unexplained.nonzero().flatten().tolist():
        issues.append(_issue(None, "overlooked_object", boxes, labels, scores, k))
    return issues


def disagreement(issues: list[BoxIssue], num_boxes: int) -> float:
    """The image's issues per annotated box (`issues / max(1, boxes)`)."""
    return len(issues) / max(1, num_boxes)


def _checked_classes(sample: Sample, labels: torch.Tensor) -> torch.Tensor:
    """Per detection: whether its class is one the image is labelled for (all, unless `labelled_classes`)."""
    if sample.labelled_classes is None:
        return torch.ones(len(labels), dtype=torch.bool)
    return torch.isin(labels, torch.tensor(sample.labelled_classes, dtype=labels.dtype))


def _issue(box: int | None, kind: IssueKind, boxes, labels, scores, k: int) -> BoxIssue:
    x1, y1, x2, y2 = (round(float(v), 2) for v in boxes[k])
    return BoxIssue(box, kind, (x1, y1, x2, y2), int(labels[k]), round(float(scores[k]), 4))
