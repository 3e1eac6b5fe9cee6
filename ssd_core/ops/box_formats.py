"""User box formats -> normalised point form, with clipping and a strict check for service input.

Formats:
  * ``xyxy``: (x1, y1, x2, y2) in pixels;
  * ``xyxy_norm``: (x1, y1, x2, y2) already normalised to [0, 1];
  * ``xywh``: COCO (x, y, w, h) in pixels, (x, y) the top-left corner.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["BOX_FORMATS", "BoxFormat", "check_pixel_boxes", "to_normalised_xyxy", "xywh_to_xyxy"]

BoxFormat = Literal["xyxy", "xyxy_norm", "xywh"]
BOX_FORMATS: tuple[str, ...] = ("xyxy", "xyxy_norm", "xywh")


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO (x, y, w, h) -> (x1, y1, x2, y2), same units.

    Args:
        boxes (Tensor[..., 4]): (x, y) top-left corner, (w, h) size.

    Returns:
        Tensor[..., 4]: (x1, y1, x2, y2).
    """
    return torch.cat((boxes[..., :2], boxes[..., :2] + boxes[..., 2:]), dim=-1)


def _check_shape_and_values(boxes: Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {tuple(boxes.shape)}")
    finite = torch.isfinite(boxes).all(dim=1)  # [N]
    if not finite.all():
        index = int((~finite).nonzero()[0])
        raise ValueError(f"{name}[{index}] = {boxes[index].tolist()} has a NaN or infinite coordinate")


def to_normalised_xyxy(
    boxes: Tensor, fmt: BoxFormat | str, image_hw: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Convert boxes to normalised (x1, y1, x2, y2), clip them to the image and flag empty ones.

    Args:
        boxes (Tensor[N, 4]): boxes in `fmt`.
        fmt: ``"xyxy"`` (pixels), ``"xyxy_norm"`` (normalised) or ``"xywh"`` (COCO, pixels).
        image_hw: (height, width) of the image in pixels.

    Returns:
        (boxes, keep): boxes (Tensor[N, 4] float32) normalised (x1, y1, x2, y2) clipped to [0, 1];
        keep (Tensor[N] bool), False for boxes with no area left after clipping: use ``boxes[keep]``
        (and the same mask on labels); the number dropped is ``(~keep).sum()``.

    Raises:
        ValueError: wrong shape, NaN/inf coordinates, unknown format or a non-positive image size.
    """
    if fmt not in BOX_FORMATS:
        raise ValueError(f"unknown box format {fmt!r}; expected one of {BOX_FORMATS}")
    height, width = image_hw
    if height <= 0 or width <= 0:
        raise ValueError(f"image_hw must be positive, got {tuple(image_hw)}")
    _check_shape_and_values(boxes, "boxes")
    xyxy = boxes.to(torch.float32)  # [N, 4]
    if fmt == "xywh":
        xyxy = xywh_to_xyxy(xyxy)
    if fmt != "xyxy_norm":
        xyxy = xyxy / torch.tensor([width, height, width, height], dtype=torch.float32)
    xyxy = xyxy.clamp(0.0, 1.0)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])  # [N]
    return xyxy, keep


def check_pixel_boxes(
    boxes: Tensor,
    image_hw: tuple[int, int],
    name: str = "boxes",
    *,
    min_size: float = 1.0,
    tolerance: float | None = 1.0,
) -> None:
    """Strict validation of user-supplied pixel boxes (service input); nothing is silently dropped.

    Args:
        boxes (Tensor[N, 4]): boxes in (x1, y1, x2, y2) pixels.
        image_hw: (height, width) of the image in pixels.
        name: how the caller refers to the boxes, used in messages.
        min_size: least width and height in pixels; 1 px catches normalised coordinates sent as pixels
            (0 for boxes that are themselves normalised).
        tolerance: how far (pixels) a box may reach beyond the image: within it a box is an annotation's
            rounding and the caller clips it (`clip_boxes_to_image`), beyond it the box was drawn for
            another image size; None allows any overhang of a box that overlaps the image.

    Raises:
        ValueError: naming the first offending box, with a hint: wrong shape, NaN/inf, x2 <= x1 or
        y2 <= y1, narrower or lower than `min_size`, beyond the image by more than `tolerance`, or
        entirely outside it.
    """
    _check_shape_and_values(boxes, name)
    height, width = image_hw
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])  # [N]
    if empty.any():
        index = int(empty.nonzero()[0])
        raise ValueError(f"{name}[{index}] = {boxes[index].tolist()} must have x2 > x1 and y2 > y1")
    sizes = boxes[:, 2:] - boxes[:, :2]  # [N, 2] (w, h)
    small = (sizes < min_size).any(dim=1)  # [N]
    if small.any():
        index = int(small.nonzero()[0])
        w, h = sizes[index].tolist()
        raise ValueError(
            f"{name}[{index}] = {boxes[index].tolist()} is {w:.3g}x{h:.3g} px, under {min_size:g} px wide or "
            f"high; boxes are (x1, y1, x2, y2) in pixels of the {width}x{height} image (normalised coordinates? "
            f"multiply x by {width} and y by {height})"
        )
    outside = (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (boxes[:, 0] >= width) | (boxes[:, 1] >= height)
    if outside.any():
        index = int(outside.nonzero()[0])
        hint = (" (these boxes are normalised to [0, 1]: pixels? divide x by the image's width and y by its height)"
                if (height, width) == (1, 1) else "")
        raise ValueError(
            f"{name}[{index}] = {boxes[index].tolist()} lies entirely outside the {width}x{height} image{hint}"
        )
    if tolerance is not None:
        overhang = torch.cat((-boxes[:, :2], boxes[:, 2:] - boxes.new_tensor([width, height])), dim=1)  # [N, 4]
        beyond = (overhang > tolerance).any(dim=1)  # [N]
        if beyond.any():
            index = int(beyond.nonzero()[0])
            raise ValueError(
                f"{name}[{index}] = {boxes[index].tolist()} reaches {float(overhang[index].max()):.3g} px beyond "
                f"the {width}x{height} image (more than the {tolerance:g} px clipped); were the boxes drawn on "
                "another size of this image?"
            )
