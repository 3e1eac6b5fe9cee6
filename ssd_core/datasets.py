"""Detection samples, data set readers (Pascal VOC, COCO) and batch collation.

A `Sample` holds one image with its boxes in *pixel* point form (x1, y1, x2, y2); `collate` turns
samples into the network's input batch and the loss's targets with *normalised* boxes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ssd_core.box_formats import to_normalised_xyxy
from ssd_core.images import to_model_input

__all__ = ["Augment", "InputSpec", "Sample", "collate"]


@dataclass
class Sample:
    """One annotated image.

    Attributes:
        image (Tensor[3, H, W] uint8): RGB image.
        boxes (Tensor[N, 4] float32): objects in (x1, y1, x2, y2) pixels.
        labels (Tensor[N] int64): 0-based object classes (background not counted).
        difficult (Tensor[N] bool): objects to ignore in matching/evaluation (VOC difficult, COCO crowd).
    """

    image: Tensor
    boxes: Tensor
    labels: Tensor
    difficult: Tensor


class InputSpec(Protocol):
    """What `collate` needs from a model's `ModelSpec`: input side and 0-255 RGB mean/std."""

    image_size: int
    pixel_mean: Sequence[float]
    pixel_std: Sequence[float]


# (image [3,H,W] uint8, boxes [N,4] pixel xyxy, labels [N], difficult [N]) -> the same, transformed.
Augment = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


def _input_geometry(spec: InputSpec | tuple[int, Sequence[float], Sequence[float]]):
    if isinstance(spec, tuple):
        return spec
    return spec.image_size, spec.pixel_mean, spec.pixel_std


def collate(
    samples: Sequence[Sample],
    spec: InputSpec | tuple[int, Sequence[float], Sequence[float]],
    augment: Augment | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Build a training/evaluation batch: augment, resize, normalise, convert boxes.

    Boxes that have no area left inside the image are dropped (with their labels and flags).

    Args:
        samples: B samples with pixel (x1, y1, x2, y2) boxes.
        spec: the model's `spec` (`image_size`, `pixel_mean`, `pixel_std` in 0-255 RGB units) or a
            tuple `(size, mean, std)`.
        augment: optional `Augment` (e.g. `ssd_augmentation()`), applied to each sample first.

    Returns:
        (images, targets): images (Tensor[B, 3, S, S] float32); targets, one Tensor[n_i, 6] float32
        per image with columns x1, y1, x2, y2 (normalised), label (0-based), difficult (0 or 1).
    """
    size, mean, std = _input_geometry(spec)
    images, targets = [], []
    for sample in samples:
        image, boxes, labels, difficult = sample.image, sample.boxes, sample.labels, sample.difficult
        if augment is not None:
            image, boxes, labels, difficult = augment(image, boxes, labels, difficult)
        normalised, keep = to_normalised_xyxy(boxes, "xyxy", (image.shape[-2], image.shape[-1]))  # [N, 4]
        target = torch.cat(
            (normalised[keep], labels[keep, None].float(), difficult[keep, None].float()), dim=1
        )  # [n_i, 6]
        images.append(to_model_input(image, size, mean, std))  # [3, S, S]
        targets.append(target)
    return torch.stack(images), targets
