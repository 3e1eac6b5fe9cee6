"""Detections drawn on their image (torchvision's `draw_bounding_boxes`): `ssd detect` and `POST /detect`
with `render=true` show the same picture."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from ssd_core.data.images import encode_png

__all__ = ["captions", "draw_detections"]

BOX_COLOUR = "red"
BOX_WIDTH = 2


def captions(class_names: Sequence[str], scores: Sequence[float]) -> list[str]:
    """`"<class name> <score, 2 decimals>"` per detection, e.g. `"ellipse 0.87"`."""
    return [f"{name} {score:.2f}" for name, score in zip(class_names, scores, strict=True)]


def draw_detections(image: Tensor, boxes: Tensor, labels: Sequence[str]) -> bytes:
    """PNG of `image` with each box outlined and captioned.

    Args:
        image (Tensor[3, H, W] uint8): RGB.
        boxes (Tensor[N, 4]): (x1, y1, x2, y2) in the image's pixels, any device.
        labels: N captions (see `captions`).

    Returns:
        The PNG bytes of the drawn image (same size as `image`).
    """
    if len(labels) != len(boxes):
        raise ValueError(f"{len(labels)} captions for {len(boxes)} boxes")
    if len(boxes) == 0:  # nothing to draw (torchvision would warn): the image itself
        return encode_png(image)
    drawn = draw_bounding_boxes(image, boxes.detach().cpu().float(), labels=list(labels), colors=BOX_COLOUR,
                                width=BOX_WIDTH)
    return encode_png(drawn)
