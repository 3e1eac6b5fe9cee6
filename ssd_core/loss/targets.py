"""Ground-truth target tensors: padding a batch to [B, M, 6] and validating it.

Row layout (ssd.pytorch's targets plus an optional flag): (x1, y1, x2, y2, label, difficult), boxes in
normalised point form, label a 0-based object class not counting background, difficult != 0 marking a
box whose priors are neither positives nor negatives. Rows with label < 0 are padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["TARGET_COLUMNS", "pad_targets", "validate_targets"]

TARGET_COLUMNS = 6


def pad_targets(
    targets: Tensor | Sequence[Tensor],
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Stack per-image targets into one padded tensor and validate it.

    Args:
        targets: a list of B tensors Tensor[n_i, 5 or 6] (no padding rows), or a padded Tensor[B, M, 5 or 6] whose rows
            with label < 0 are padding; boxes (x1, y1, x2, y2) normalised, then the 0-based label,
            then optionally the difficult flag.
        num_classes: classes of the conf tensor including background; when given, labels must lie in
            [0, num_classes - 2].
        device, dtype: of the result.

    Returns:
        Tensor[B, M, 6] with M = max(1, max n_i); padding rows have label -1, zero box and flag.

    Raises:
        ValueError: naming the tensor and shape for a bad layout, or `targets[b][i]` for a bad box or label.
    """
    if isinstance(targets, Tensor):
        if targets.dim() != 3 or targets.shape[-1] not in (5, 6):
            raise ValueError(f"targets must be a list of [n, 5|6] tensors or [B, M, 5|6], got {tuple(targets.shape)}")
        padded = _six_columns(targets.to(device=device, dtype=dtype))
    else:
        padded = _pad_list([_as_rows(t, b) for b, t in enumerate(targets)], device, dtype)
    if padded.shape[1] == 0:
        padded = padded.new_full((padded.shape[0], 1, TARGET_COLUMNS), -1.0)
    padding = padded[..., 4:5] < 0  # [B, M, 1]
    padded = torch.where(padding, _PADDING_ROW.to(padded), padded)
    validate_targets(padded, num_classes)
    return padded


_PADDING_ROW = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 0.0])


def _as_rows(rows: Tensor, image: int) -> Tensor:
    rows = torch.as_tensor(rows)
    if rows.numel() == 0:
        return rows.reshape(0, 5)
    if rows.dim() != 2 or rows.shape[1] not in (5, 6):
        raise ValueError(f"targets[{image}] must have shape [n, 5] or [n, 6], got {tuple(rows.shape)}")
    return rows


def _pad_list(rows: list[Tensor], device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
    """Scatter B tensors [n_i, 5|6] into Tensor[B, max n_i, 6] (label -1 elsewhere) with one copy."""
    if len({r.shape[1] for r in rows}) > 1:
        rows = [_six_columns(r) for r in rows]
    counts = torch.tensor([len(r) for r in rows], dtype=torch.long)  # [B]
    flat = torch.cat(rows) if rows else torch.zeros(0, TARGET_COLUMNS)
    flat = _six_columns(flat.to(device=device, dtype=dtype))  # [N, 6], on `device` or where the rows are
    image = torch.repeat_interleave(torch.arange(len(rows)), counts)  # [N]
    slot = torch.arange(len(image)) - (counts.cumsum(0) - counts)[image]  # [N] row within its image
    negative = (flat[:, 4] < 0).nonzero()
    if len(negative):
        i = int(negative[0])
        raise ValueError(f"targets[{int(image[i])}][{int(slot[i])}]: label {flat[i, 4].item()} is negative; "
                         "only padded [B, M, 5|6] targets have padding rows")
    padded = flat.new_zeros((len(rows), int(counts.max()) if rows else 0, TARGET_COLUMNS))
    padded[:, :, 4] = -1
    padded[image.to(padded.device), slot.to(padded.device)] = flat
    return padded


def _six_columns(rows: Tensor) -> Tensor:
    """Append a zero difficult flag to [..., 5] rows."""
    if rows.shape[-1] == TARGET_COLUMNS:
        return rows
    return torch.cat((rows, rows.new_zeros((*rows.shape[:-1], 1))), dim=-1)


def _box_problem(box: list[float]) -> str:
    if not all(math.isfinite(v) for v in box):
        return "has a non-finite coordinate"
    return "has x2 <= x1" if box[2] <= box[0] else "has y2 <= y1"


def validate_targets(targets: Tensor, num_classes: int | None = None) -> None:
    """Raise ValueError naming the first bad non-padding row of padded targets.

    A row is bad when its box has a non-finite coordinate, zero or negative width or height (this
    includes inverted corners), or its label is not an integer in [0, num_classes - 2].

    Args:
        targets (Tensor[B, M, 6]): padded targets, rows with label < 0 (and finite) are padding.
        num_classes: classes including background; None skips the label range check.
    """
    boxes, labels = targets[..., :4], targets[..., 4]  # [B, M, 4], [B, M]
    real = ~(labels < 0)  # NaN labels count as real rows and fail below
    finite = torch.isfinite(boxes).all(-1)
    box_bad = real & ~(finite & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1]))
    label_bad = real & (~torch.isfinite(labels) | (labels != labels.round()))
    if num_classes is not None:
        label_bad |= real & (labels > num_classes - 2)
    flag_bad = real & ~torch.isfinite(targets[..., 5])
    for bad, describe in (
        (box_bad, lambda b, i: f"box {boxes[b, i].tolist()} {_box_problem(boxes[b, i].tolist())}"),
        (label_bad, lambda b, i: f"label {labels[b, i].item()} is not a class index in [0, {_max_label(num_classes)}]"),
        (flag_bad, lambda b, i: f"difficult flag {targets[b, i, 5].item()} is not finite"),
    ):
        if bad.any():
            b, i = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"targets[{b}][{i}]: {describe(b, i)}")


def _max_label(num_classes: int | None) -> str:
    return "num_classes - 2" if num_classes is None else str(num_classes - 2)
