"""Detections drawn on their image (torchvision's `draw_bounding_boxes`): `ssd detect` and `POST /detect`
with `render=true` show the same picture, each class in its own colour."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from ssd_core.data.images import encode_png

__all__ = ["CLASS_COLOURS", "captions", "class_colour", "draw_detections"]

# Tableau's 10 and their light variants: distinguishable on photos and on the synthetic shapes' textures
CLASS_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)
BOX_WIDTH = 2


def class_colour(label: int) -> str:
    """The colour of 0-based object class `label` (background excluded); past 20 classes colours repeat."""
    return CLASS_COLOURS[label % len(CLASS_COLOURS)]


def captions(class_names: Sequence[str], scores: Sequence[float]) -> list[str]:
    """`"<class name> <score, 2 decimals>"` per detection, e.g. `"ellipse 0.87"`."""
    return [f"{name} {score:.2f}" for name, score in zip(class_names, scores, strict=True)]


def draw_detections(image: Tensor, boxes: Tensor, labels: Sequence[str], classes: Sequence[int]) -> bytes:
    """PNG of `image` with each box outlined and captioned in its class's colour.

    Args:
        image (Tensor[3, H, W] uint8): RGB.
        boxes (Tensor[N, 4]): (x1, y1, x2, y2) in the image's pixels, any device.
        labels: N captions (see `captions`).
        classes: N 0-based object classes, which pick the colours (`class_colour`).

    Returns:
        The PNG bytes of the drawn image (same size as `image`).
    """
    if not len(labels) == len(classes) == len(boxes):
        raise ValueError(f"{len(labels)} captions and {len(classes)} classes for {len(boxes)} boxes")
    if len(boxes) == 0:  # nothing to draw (torchvision would warn): the image itself
        return encode_png(image)
    colours = [class_colour(int(label)) for label in classes]
    drawn = draw_bounding_boxes(image, boxes.detach().cpu().float(), labels=list(labels), colors=colours,
                                width=BOX_WIDTH)
    return encode_png(drawn)
