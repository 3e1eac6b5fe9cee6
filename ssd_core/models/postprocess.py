"""Inference post-processing: network output -> scored, labelled boxes in image pixels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ssd_core.ops.boxes import invalid_box_mask
from ssd_core.ops.coder import decode
from ssd_core.ops.nms import grouped_nms

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
    score_threshold: float | Sequence[float] = 0.01,
    nms_iou: float = 0.45,
    max_detections: int | Sequence[int] = 100,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    bkg_label: int = 0,
    top_k_per_class: int = 200,
) -> list[Detections]:
    """Threshold, decode, per-class NMS and top-k, as ssd.pytorch's `Detect` (with clipping), for the whole
    batch at once: one `grouped_nms` over every image's candidates (NMS groups by image and class).

    Only the (prior, class) pairs above the score threshold are decoded and enter NMS; a class with more than
    `top_k_per_class` of them in an image keeps its `top_k_per_class` best, as `Detect`'s top-k then threshold
    would. A top-k along the priors for every class and image cost more than the rest of `detect` (ssd-small,
    21 classes, batch 8: 7.7 of 16 ms, nothing passing a 0.3 threshold).

    Args:
        loc (Tensor[B, P, 4]): predicted offsets from the priors.
        conf (Tensor[B, P, C]): raw class logits, background column `bkg_label` included.
        priors (Tensor[P, 4]): priors in normalised (cx, cy, w, h).
        variances: the box coder's (center, size) variances.
        score_threshold: keep (prior, class) pairs whose probability is above this; one for the batch or one
            per image.
        nms_iou: IoU above which a lower-scored box of the same class is suppressed.
        max_detections: boxes kept per image after NMS; one for the batch or one per image.
        image_sizes: (height, width) of each original image; boxes are scaled to its pixels.
            None returns normalised boxes.
        bkg_label: index of the background column.
        top_k_per_class: highest-scoring priors per class and image that enter NMS (bounds NMS cost).

    Returns:
        One `Detections` per image, highest score first (equal scores: lower prior, then lower class first);
        boxes clipped to the image, degenerate ones dropped.
    """
    batch = loc.shape[0]
    thresholds = _per_image(score_threshold, batch, "score_threshold")
    limits = _per_image(max_detections, batch, "max_detections")
    _validate(loc, conf, priors, image_sizes, bkg_label, thresholds, nms_iou, limits)
    probabilities = _class_probabilities(conf)  # [B, P, C]
    image, prior, column = _candidates(probabilities, thresholds, bkg_label, top_k_per_class)  # [N] each
    cand_scores = probabilities[image, prior, column]  # [N]
    cand_boxes = decode(loc[image, prior], priors[prior], variances).clamp(0.0, 1.0)  # [N, 4] normalised xyxy
    label = column - (column > bkg_label).long()  # [N] object class, background not counted
    valid = ~invalid_box_mask(cand_boxes)  # boxes clipped to nothing
    cand_boxes, cand_scores, image, label = cand_boxes[valid], cand_scores[valid], image[valid], label[valid]
    # NMS grouped by (image, class); in float64 because grouped_nms offsets groups apart, and offsets of hundreds
    # in float32 would blur IoUs near the threshold
    groups = image * (conf.shape[-1] - 1) + label
    keep = grouped_nms(cand_boxes.double(), cand_scores.double(), groups, nms_iou)  # [M]
    # by image, then score, equal scores in candidate order: nms may order ties differently from call to call
    keep = keep.sort().values
    keep = keep[cand_scores[keep].sort(descending=True, stable=True).indices]
    keep = keep[image[keep].sort(stable=True).indices]
    if image_sizes is not None:
        scale = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=cand_boxes.dtype, device=cand_boxes.device)
        cand_boxes = cand_boxes * scale[image]  # [N, 4] pixels of each candidate's image
    counts = torch.bincount(image[keep], minlength=batch).tolist()
    results, start = [], 0
    for b in range(batch):
        rows = keep[start : start + min(counts[b], limits[b])]
        results.append(Detections(cand_boxes[rows], cand_scores[rows], label[rows]))
        start += counts[b]
    return results


def _candidates(
    probabilities: Tensor, thresholds: Sequence[float], bkg_label: int, top_k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The (image, prior, column) of every object-class probability above its image's threshold, but of an
    (image, class) with more than `top_k` of them only its `top_k` highest (all above the threshold, then);
    ordered by image, prior, column.

    Args:
        probabilities (Tensor[B, P, C]): softmax over the classes.
        thresholds: one per image.

    Returns:
        (image, prior, column), Tensor[N] long each.
    """
    num_priors, num_columns = probabilities.shape[1:]
    threshold = torch.tensor(thresholds, dtype=probabilities.dtype, device=probabilities.device)  # [B]
    passed = probabilities > threshold[:, None, None]  # [B, P, C]
    passed[..., bkg_label] = False
    crowded = passed.sum(dim=1) > top_k  # [B, C]
    if not crowded.any():
        return passed.nonzero(as_tuple=True)  # [N] each, in (image, prior, column) order
    passed &= ~crowded[:, None, :]
    image, prior, column = passed.nonzero(as_tuple=True)  # [N] each
    crowded_image, crowded_column = crowded.nonzero(as_tuple=True)  # [G] each
    best = probabilities[crowded_image, :, crowded_column].topk(top_k, dim=1).indices  # [G, top_k]
    image = torch.cat((image, crowded_image.repeat_interleave(top_k)))
    prior = torch.cat((prior, best.flatten()))
    column = torch.cat((column, crowded_column.repeat_interleave(top_k)))
    order = ((image * num_priors + prior) * num_columns + column).argsort()  # back to (image, prior, column)
    return image[order], prior[order], column[order]


def detect_with_spec(spec: ModelSpec, loc: Tensor, conf: Tensor, priors: Tensor, **options: Any) -> list[Detections]:
    """`detect` with the box coder variances of the network described by `spec` (its prior config's).

    Args:
        spec: the network's `ModelSpec`.
        loc (Tensor[B, P, 4]), conf (Tensor[B, P, C]), priors (Tensor[P, 4]): its output.
        options: `detect`'s other keyword arguments (score_threshold, nms_iou, max_detections, ...).
    """
    return detect(loc, conf, priors, variances=spec.prior_config.variance, **options)


def _class_probabilities(conf: Tensor) -> Tensor:
    """softmax over the class axis of conf [B, P, C]. torch's CPU softmax along a last axis of fewer than 16
    elements runs about 10x slower than along the prior axis (ssd-small's C = 4: 9 ms against 1 ms at B = 8),
    so few classes are normalised class-major; 16 and more along the last axis, where it is the faster."""
    if conf.device.type == "cpu" and conf.shape[-1] < 16:
        return conf.transpose(1, 2).softmax(dim=1).transpose(1, 2)
    return conf.softmax(dim=-1)


def _per_image(value: float | Sequence[float], batch: int, name: str) -> list:
    if isinstance(value, int | float):
        return [value] * batch
    if len(value) != batch:
        raise ValueError(f"{name} has {len(value)} entries for a batch of {batch}")
    return list(value)


def _validate(
    loc: Tensor,
    conf: Tensor,
    priors: Tensor,
    image_sizes: Sequence[tuple[int, int]] | None,
    bkg_label: int,
    score_thresholds: Sequence[float],
    nms_iou: float,
    max_detections: Sequence[int],
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
    for score_threshold in score_thresholds:
        if not 0.0 <= score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold}")
    if not 0.0 < nms_iou <= 1.0:
        raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
    for limit in max_detections:
        if limit < 1:
            raise ValueError(f"max_detections must be >= 1, got {limit}")
    if image_sizes is not None:
        if len(image_sizes) != loc.shape[0]:
            raise ValueError(f"image_sizes has {len(image_sizes)} entries for a batch of {loc.shape[0]}")
        for i, (height, width) in enumerate(image_sizes):
            if height <= 0 or width <= 0:
                raise ValueError(f"image_sizes[{i}] = ({height}, {width}) must be positive (height, width)")
