"""Annotation corruptions a labelling pipeline produces, as functions of a clean `Sample`: what the
screening and the gate are measured against (benchmarks/bench_young.py, the tests).

Each takes a sample (pixel (x1, y1, x2, y2) boxes, 0-based labels) and returns the corrupted copy
(the image is shared, never modified); `corrupt_job` applies one to a share of a job's images.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from ssd_core.data.datasets import Sample

__all__ = [
    "Corruption", "corrupt_job", "corruptions", "drop_half_objects", "rotate_labels", "shift_boxes", "swap_classes",
    "wrong_image_scale", "xywh_as_xyxy",
]

Corruption = Callable[[Sample], Sample]


def _with(sample: Sample, boxes: torch.Tensor | None = None, labels: torch.Tensor | None = None,
          keep: torch.Tensor | None = None) -> Sample:
    boxes = sample.boxes if boxes is None else boxes
    labels = sample.labels if labels is None else labels
    difficult = sample.difficult
    if keep is not None:
        boxes, labels, difficult = boxes[keep], labels[keep], difficult[keep]
    return Sample(sample.image, boxes.clone(), labels.clone(), difficult.clone(), sample.labelled_classes)


def _clip(boxes: torch.Tensor, sample: Sample) -> torch.Tensor:
    height, width = sample.image.shape[-2:]
    return torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height), boxes[:, 2].clamp(0, width),
                        boxes[:, 3].clamp(0, height)], dim=1)


def shift_boxes(sample: Sample) -> Sample:
    """Boxes moved right and down by half their width and height (clipped to the image): a coordinate bug."""
    size = sample.boxes[:, 2:] - sample.boxes[:, :2]  # [N, 2]
    return _with(sample, boxes=_clip(sample.boxes + torch.cat([size, size], dim=1) / 2, sample))


def rotate_labels(num_labels: int) -> Corruption:
    """Every label moved to the next of `num_labels` object classes (an off-by-one in the class order)."""
    def corrupt(sample: Sample) -> Sample:
        return _with(sample, labels=(sample.labels + 1) % num_labels)
    return corrupt


def swap_classes(first: int, second: int) -> Corruption:
    """Labels `first` and `second` exchanged (two classes confused in the label map); others unchanged."""
    def corrupt(sample: Sample) -> Sample:
        labels = sample.labels.clone()
        labels[sample.labels == first], labels[sample.labels == second] = second, first
        return _with(sample, labels=labels)
    return corrupt


def drop_half_objects(sample: Sample) -> Sample:
    """Every other object left unlabelled (the first kept): half the objects, rounded down, are missing."""
    return _with(sample, keep=torch.arange(len(sample.boxes)) % 2 == 0)


def xywh_as_xyxy(sample: Sample) -> Sample:
    """(x, y, w, h) boxes sent as (x1, y1, x2, y2): the third and fourth numbers are the width and height.
    Boxes whose width is below their x (or height below y) come out inverted: the service refuses them."""
    boxes = sample.boxes.clone()
    boxes[:, 2:] = sample.boxes[:, 2:] - sample.boxes[:, :2]
    return _with(sample, boxes=boxes)


def wrong_image_scale(factor: float) -> Corruption:
    """Normalised boxes turned into pixels with another image size: every coordinate x `factor` (e.g. 0.625:
    a 256 px image's boxes scaled for 160 px), clipped to the image."""
    def corrupt(sample: Sample) -> Sample:
        return _with(sample, boxes=_clip(sample.boxes * factor, sample))
    return corrupt


def corruptions(num_labels: int) -> dict[str, Corruption]:
    """The benchmark's corruptions by name, for `num_labels` object classes."""
    return {
        "shifted_boxes": shift_boxes, "rotated_labels": rotate_labels(num_labels), "swapped_classes": swap_classes(0, 1),
        "half_unlabelled": drop_half_objects, "xywh_as_xyxy": xywh_as_xyxy, "wrong_scale": wrong_image_scale(0.625),
    }


def corrupt_job(samples: Sequence[Sample], corruption: Corruption, share: float, seed: int) -> tuple[list[Sample], list[int]]:
    """`corruption` applied to round(share x len(samples)) images chosen at random (`seed`), at least one when
    share > 0; returns the job's samples and the corrupted indices (sorted)."""
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    count = 0 if share == 0 else max(1, round(share * len(samples)))
    chosen = sorted(random.Random(seed).sample(range(len(samples)), count))
    return [corruption(s) if i in chosen else s for i, s in enumerate(samples)], chosen
