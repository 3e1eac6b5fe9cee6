"""Inference post-processing: network output -> scored, labelled boxes in image pixels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ssd_core.ops.boxes import invalid_box_mask
from ssd_core.ops.coder import decode

if TYPE_CHECKING:
    from ssd_core.models.base import ModelSpec

__all__ = ["Detections", "detect", "detect_with_spec"]


@dataclass(frozen=True)
class Detections:
    """Detections of one image, highest score first.

    Attributes:
        boxes (Tensor[K, 4]): (x1, y1, x2, y2) in the original image's pixels (normalised [0, 1]
            when `detect` got no image size).
        scores (Tensor[K]): class probability (softmax) of each box.
        labels (Tensor[K], int64): 0-based object class, background not counted.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor


def detect(
    loc: Tensor,
    conf: Tensor,
    priors: Tensor,
    *,
    variances: Sequence[float] = (0.1, 0.2),
    score_threshold: float = 0.01,
    nms_iou: float = 0.45,
    max_detections: int = 100,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    bkg_label: int = 0,
    top_k_per_class: int = 200,
) -> list[Detections]:
    """Decode, threshold, per-class NMS and top-k, as ssd.pytorch's `Detect` (with clipping).

    Args:
        loc (Tensor[B, P, 4]): predicted offsets from the priors.
        conf (Tensor[B, P, C]): raw class logits, background column `bkg_label` included.
        priors (Tensor[P, 4]): priors in normalised (cx, cy, w, h).
        variances: the box coder's (center, size) variances.
        score_threshold: keep (prior, class) pairs whose probability is above this.
        nms_iou: IoU above which a lower-scored box of the same class is suppressed.
        max_detections: boxes kept per image after NMS.
        image_sizes: (height, width) of each original image; boxes are scaled to its pixels.
            None returns normalised boxes.
        bkg_label: index of the background column.
        top_k_per_class: highest-scoring priors per class that enter NMS (bounds NMS cost).

    Returns:
        One `Detections` per image; boxes clipped to the image, degenerate ones dropped.
    """
    _validate(loc, conf, priors, image_sizes, bkg_label, score_threshold, nms_iou, max_detections)
    object_columns = [c for c in range(conf.shape[-1]) if c != bkg_label]
    scores = conf.softmax(dim=-1)[..., object_columns]  # [B, P, C - 1]
    boxes = decode(loc, priors, variances).clamp(0.0, 1.0)  # [B, P, 4] normalised xyxy
    results = []
    for b in range(loc.shape[0]):
        kept = _detect_one(boxes[b], scores[b], score_threshold, nms_iou, max_detections, top_k_per_class)
        if image_sizes is not None:
            height, width = image_sizes[b]
            scale = kept.boxes.new_tensor([width, height, width, height])
            kept = Detections(kept.boxes * scale, kept.scores, kept.labels)
        results.append(kept)
    return results


def detect_with_spec(spec: ModelSpec, loc: Tensor, conf: Tensor, priors: Tensor, **options: Any) -> list[Detections]:
    """`detect` with the box coder variances of the network described by `spec` (its prior config's).

    Args:
        spec: the network's `ModelSpec`.
        loc (Tensor[B, P, 4]), conf (Tensor[B, P, C]), priors (Tensor[P, 4]): its output.
        options: `detect`'s other keyword arguments (score_threshold, nms_iou, max_detections, ...).
    """
    return detect(loc, conf, priors, variances=spec.prior_config.variance, **options)


def _detect_one(
    boxes: Tensor, scores: Tensor, score_threshold: float, nms_iou: float, max_detections: int, top_k: int
) -> Detections:
    """boxes (Tensor[P, 4]) normalised xyxy, scores (Tensor[P, K]) per object class -> Detections."""
    top_scores, top_priors = scores.topk(min(top_k, scores.shape[0]), dim=0)  # [k, K] each
    classes = torch.arange(scores.shape[1], device=scores.device).expand_as(top_priors)  # [k, K]
    passed = top_scores > score_threshold
    cand_scores, cand_labels = top_scores[passed], classes[passed]  # [N]
    cand_boxes = boxes[top_priors[passed]]  # [N, 4]
    valid = ~invalid_box_mask(cand_boxes)  # boxes clipped to nothing
    cand_boxes, cand_scores, cand_labels = cand_boxes[valid], cand_scores[valid], cand_labels[valid]
    keep = batched_nms(cand_boxes, cand_scores, cand_labels, nms_iou)[:max_detections]  # by score
    return Detections(cand_boxes[keep], cand_scores[keep], cand_labels[keep])


def _validate(
    loc: Tensor,
    conf: Tensor,
    priors: Tensor,
    image_sizes: Sequence[tuple[int, int]] | None,
    bkg_label: int,
    score_threshold: float,
    nms_iou: float,
    max_detections: int,
) -> None:
    if loc.dim() != 3 or loc.shape[-1] != 4:
        raise ValueError(f"loc must have shape [B, P, 4], got {tuple(loc.shape)}")
    if conf.dim() != 3 or conf.shape[:2] != loc.shape[:2] or conf.shape[-1] < 2:
        raise ValueError(
            f"conf must have shape [B, P, C] with C >= 2 and loc's B, P; got {tuple(conf.shape)}"
        )
    if priors.shape != (loc.shape[1], 4):
        raise ValueError(f"priors must have shape [{loc.shape[1]}, 4], got {tuple(priors.shape)}")
    if not 0 <= bkg_label < conf.shape[-1]:
        raise ValueError(f"bkg_label must be in [0, {conf.shape[-1]}), got {bkg_label}")
    if not 0.0 <= score_threshold < 1.0:
        raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold}")
    if not 0.0 < nms_iou <= 1.0:
        raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")
    if image_sizes is not None:
        if len(image_sizes) != loc.shape[0]:
            raise ValueError(f"image_sizes has {len(image_sizes)} entries for a batch of {loc.shape[0]}")
        for i, (height, width) in enumerate(image_sizes):
            if height <= 0 or width <= 0:
                raise ValueError(f"image_sizes[{i}] = ({height}, {width}) must be positive (height, width)")
