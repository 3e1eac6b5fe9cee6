"""Partial labels: images whose annotations are complete for some object classes only.

An image that declares `labelled_classes` has every object of those classes boxed; objects of other
classes may be present but unboxed. For such an image the confidence loss (positives, negatives and
the hard-negative ranking) uses the softmax over the background and the declared classes only: the
other columns of conf get a logit bias of -inf, so an unboxed object of an undeclared class is never
taught as background against its own class (its column gets no gradient). Every box of the image
must carry a declared label.

A class mask is Tensor[B, C] bool over the columns of conf (background included); the background
column is always used, whatever the mask says there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_declared", "class_mask_bias", "labelled_class_mask"]


def labelled_class_mask(
    labelled_classes: Sequence[Sequence[int] | None], num_classes: int, bkg_label: int = 0
) -> Tensor | None:
    """The class mask of a batch from each image's declared object labels.

    Args:
        labelled_classes: per image the 0-based object labels (background not counted) its boxes are
            complete for, or None for an image labelled for every class.
        num_classes: columns of conf, background included.
        bkg_label: the background column; label l is column l if l < bkg_label else l + 1.

    Returns:
        Tensor[B, C] bool (True = the column takes part in the image's softmax; background always
        True), or None when no image declares anything (the loss's default path).

    Raises:
        ValueError: naming `labelled_classes[b]` for a label outside [0, num_classes - 2].
    """
    if all(labels is None for labels in labelled_classes):
        return None
    mask = torch.ones(len(labelled_classes), num_classes, dtype=torch.bool)
    for b, labels in enumerate(labelled_classes):
        if labels is None:
            continue
        labels = torch.as_tensor(list(labels), dtype=torch.long)  # [L_b]
        bad = (labels < 0) | (labels > num_classes - 2)
        if bad.any():
            raise ValueError(f"labelled_classes[{b}]: label {int(labels[bad][0])} is not an object class "
                             f"in [0, {num_classes - 2}]")
        mask[b] = False
        mask[b, labels + (labels >= bkg_label)] = True
        mask[b, bkg_label] = True
    return mask


def class_mask_bias(class_mask: Tensor, bkg_label: int, dtype: torch.dtype) -> Tensor:
    """Logit bias of a class mask: 0 in the used columns and the background one, -inf elsewhere.

    Args:
        class_mask (Tensor[B, C] bool).

    Returns:
        Tensor[B, C] of `dtype`, on the mask's device.
    """
    used = class_mask.clone()
    used[:, bkg_label] = True
    return torch.zeros(used.shape, dtype=dtype, device=used.device).masked_fill_(~used, float("-inf"))


def check_declared(labels: Tensor, truth_columns: Tensor, valid: Tensor, bias: Tensor) -> None:
    """Raise ValueError naming the first real truth whose class the image's mask leaves out.

    Args:
        labels (Tensor[B, M]): 0-based object label of each truth.
        truth_columns (Tensor[B, M] long): conf column of each truth (background skipped).
        valid (Tensor[B, M] bool): real (non-padding) truths.
        bias (Tensor[B, C]): from `class_mask_bias`.
    """
    undeclared = valid & bias.gather(1, truth_columns).isinf()  # [B, M]
    if undeclared.any():
        b, i = (int(v) for v in undeclared.nonzero()[0])
        raise ValueError(f"targets[{b}][{i}]: label {int(labels[b, i])} is not among image {b}'s labelled classes")
