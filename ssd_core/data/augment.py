"""SSD's training augmentation (Liu et al. 2016; ssd.pytorch's `SSDAugmentation`) on torchvision.transforms.v2.

Photometric distortion, zoom out (expand onto a canvas filled with the mean), IoU crop, horizontal
flip, then boxes that left the image or became degenerate are removed together with their labels and
difficult flags. Resizing and normalisation are not part of it (see `ssd_core.data.images.to_model_input`).
Randomness comes from torch's global generator: seed it with `torch.manual_seed` for repeatable runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["AUGMENTATIONS", "AugmentConfig", "SSDAugmentation", "ssd_augmentation"]


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each step.

    Attributes:
        photometric_p: probability of each photometric change (brightness, contrast, saturation, hue,
            channel order) in `v2.RandomPhotometricDistort`.
        zoom_out_p: probability of zooming out.
        max_zoom_out: largest canvas side relative to the image side (SSD: 4).
        iou_crop: apply SSD's minimum-IoU random crop (`v2.RandomIoUCrop`).
        flip_p: probability of a horizontal flip.
    """

    photometric_p: float = 0.5
    zoom_out_p: float = 0.5
    max_zoom_out: float = 4.0
    iou_crop: bool = True
    flip_p: float = 0.5


AUGMENTATIONS: dict[str, AugmentConfig] = {
    # photometric distortion and horizontal flip only: every object keeps its size and stays whole. On many
    # steps over few images (the annotation stream: 8 images x 32 steps) it doubled held-out mAP@0.5 after
    # 80 images (0.41 -> 0.81, benchmarks/bench_recipe.py), where SSD's zoom out and crops, made for long
    # training, reached 0.48
    "flip": AugmentConfig(zoom_out_p=0.0, iou_crop=False),
    "ssd": AugmentConfig(),  # SSD's full augmentation
}


def _labels_and_flags(sample: dict) -> tuple[Tensor, Tensor]:
    return sample["labels"], sample["difficult"]


class SSDAugmentation:
    """Callable `(image, boxes, labels, difficult) -> (image, boxes, labels, difficult)`.

    Args (of the call):
        image (Tensor[3, H, W] uint8): RGB image.
        boxes (Tensor[N, 4]): (x1, y1, x2, y2) in pixels.
        labels (Tensor[N]), difficult (Tensor[N]): kept aligned with the boxes.

    Returns:
        image (Tensor[3, H', W'] uint8), boxes (Tensor[M, 4] float32 pixel (x1, y1, x2, y2) inside the
        new image), labels (Tensor[M]), difficult (Tensor[M]): M <= N, the boxes kept.
    """

    def __init__(self, config: AugmentConfig, fill: Sequence[float]) -> None:
        self.config = config
        fill_values = [round(float(value)) for value in fill]  # uint8 image: integer fill
        photometric = v2.RandomPhotometricDistort(p=config.photometric_p)
        zoom_out = v2.RandomZoomOut(
            fill={tv_tensors.Image: fill_values, "others": 0},
            side_range=(1.0, config.max_zoom_out),
            p=config.zoom_out_p,
        )
        flip = v2.RandomHorizontalFlip(p=config.flip_p)
        sanitize = v2.SanitizeBoundingBoxes(labels_getter=_labels_and_flags)
        crop = [v2.RandomIoUCrop()] if config.iou_crop else []
        self.transform = v2.Compose([photometric, zoom_out, *crop, flip, sanitize])
        # The IoU crop needs at least one box to aim at; images without boxes skip it.
        self.transform_without_boxes = v2.Compose([photometric, zoom_out, flip])

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, difficult: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sample = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(
                boxes.to(torch.float32), format="XYXY", canvas_size=tuple(image.shape[-2:])
            ),
            "labels": labels,
            "difficult": difficult,
        }
        transform = self.transform if len(boxes) else self.transform_without_boxes
        out = transform(sample)
        return (
            out["image"].as_subclass(Tensor),
            out["boxes"].as_subclass(Tensor),
            out["labels"],
            out["difficult"],
        )


def _identity(
    image: Tensor, boxes: Tensor, labels: Tensor, difficult: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return image, boxes, labels, difficult


def ssd_augmentation(
    enabled: bool = True,
    fill: Sequence[float] = (123.0, 117.0, 104.0),
    config: AugmentConfig | None = None,
):
    """SSD's augmentation as a callable for `ssd_core.data.datasets.collate`.

    Args:
        enabled: False returns the identity (evaluation, or augmentation switched off).
        fill: RGB colour (0-255) of the zoom-out canvas, normally the model's `spec.pixel_mean`.
        config: step probabilities and ranges; `AugmentConfig()` by default.

    Returns:
        A callable `(image [3,H,W] uint8, boxes [N,4] pixel xyxy, labels [N], difficult [N])`
        -> the same, augmented (see `SSDAugmentation`).
    """
    if not enabled:
        return _identity
    if len(fill) != 3:
        raise ValueError(f"fill must have 3 RGB values, got {list(fill)}")
    return SSDAugmentation(config or AugmentConfig(), fill)
