"""Match statistics of one loss evaluation, built from tensors the loss already has (all detached):
per image (`MatchStats`) and per object class (`ClassStats`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["ClassStats", "MatchStats"]


@dataclass(frozen=True)
class ClassStats:
    """Sums per object class over a batch (or, added up, over several); index = 0-based label,
    background not counted. Every tensor is detached.

    Attributes:
        num_ground_truth (Tensor[L] long): real truths of each class, difficult ones included.
        num_positives (Tensor[L] long): positive priors matched to a truth of the class.
        num_forced_matches (Tensor[L] long): non-difficult truths of the class matched only by the forced
            (or bipartite) step.
        matched_iou_sum (Tensor[L]): IoU of the class's positives with their truths, summed.
        loss_l_sum (Tensor[L]): loc_weight * Smooth L1 over the class's positives, not normalised.
        loss_c_sum (Tensor[L]): cross-entropy over the class's positives, not normalised.
        negative_loss_c_sum (Tensor[]): cross-entropy over all negatives (the background figure), so
            that loss_c_sum.sum() + negative_loss_c_sum is the batch's conf-loss sum.
        normalizer (Tensor[] float): the batch's N (summed over batches when added up).
    """

    num_ground_truth: Tensor
    num_positives: Tensor
    num_forced_matches: Tensor
    matched_iou_sum: Tensor
    loss_l_sum: Tensor
    loss_c_sum: Tensor
    negative_loss_c_sum: Tensor
    normalizer: Tensor

    def __post_init__(self) -> None:
        for field in fields(self):
            object.__setattr__(self, field.name, getattr(self, field.name).detach())

    def __add__(self, other: ClassStats) -> ClassStats:
        """Pooled sums of two batches (e.g. the steps of a fine-tune job), on this one's device."""
        return ClassStats(**{f.name: getattr(self, f.name) + getattr(other, f.name).to(getattr(self, f.name).device)
                             for f in fields(self)})

    def to(self, device: torch.device | str) -> ClassStats:
        """A copy with every tensor on `device`."""
        return ClassStats(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def rows(self, class_names: Sequence[str]) -> list[dict[str, float | int | str]]:
        """One dict per class: label, class_name, num_ground_truth, num_positives, num_forced_matches,
        positives_per_box (positives / truths, 0 without truths), mean_matched_iou (0 without positives),
        loss_l and loss_c (the class's positives' losses divided by N, the share of the batch losses).
        """
        if len(class_names) != len(self.num_ground_truth):
            raise ValueError(f"{len(class_names)} class names for {len(self.num_ground_truth)} classes")
        normalizer = self.normalizer.to(torch.float64)
        positives = self.num_positives.to(torch.float64)
        columns = zip(
            self.num_ground_truth.tolist(),
            self.num_positives.tolist(),
            self.num_forced_matches.tolist(),
            (positives / self.num_ground_truth.clamp(min=1)).tolist(),
            (self.matched_iou_sum / self.num_positives.clamp(min=1)).tolist(),
            (self.loss_l_sum / normalizer).tolist(),
            (self.loss_c_sum / normalizer).tolist(),
            strict=True,
        )
        keys = ("num_ground_truth", "num_positives", "num_forced_matches", "positives_per_box", "mean_matched_iou",
                "loss_l", "loss_c")
        return [{"label": label, "class_name": name, **dict(zip(keys, values, strict=True))}
                for label, (name, values) in enumerate(zip(class_names, columns, strict=True))]


@dataclass(frozen=True)
class MatchStats:
    """Per-image counts and sums of one batch; every tensor is detached.

    Attributes:
        num_ground_truth (Tensor[B] long): real (non-padding) truths, difficult ones included.
        num_positives (Tensor[B] long): positive priors.
        num_negatives (Tensor[B] long): negatives selected for the conf loss (mined, or all eligible).
        num_ignored (Tensor[B] long): priors neither positive nor eligible as negative (IoU in
            [neg_overlap, overlap_thresh), or tied to a difficult truth); 0 for images without truths.
        num_forced_matches (Tensor[B] long): non-difficult truths whose best IoU with any prior is below
            the threshold, i.e. matched only by the forced (or bipartite) step.
        matched_iou_sum (Tensor[B]): sum over positives of the IoU with their truth.
        loss_l_sum (Tensor[B]): loc_weight * Smooth L1 summed over positives, not normalised.
        loss_c_sum (Tensor[B]): cross-entropy summed over positives and negatives, not normalised.
        matched_ious (Tensor[K]): IoU of each positive prior with its truth, image by image.
        normalizer (Tensor[] float): N = max(1, total positives), the divisor of both batch losses.
        per_class (ClassStats): the same figures summed per object class over the batch.
    """

    num_ground_truth: Tensor
    num_positives: Tensor
    num_negatives: Tensor
    num_ignored: Tensor
    num_forced_matches: Tensor
    matched_iou_sum: Tensor
    loss_l_sum: Tensor
    loss_c_sum: Tensor
    matched_ious: Tensor
    normalizer: Tensor
    per_class: ClassStats

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Tensor):  # per_class detaches its own
                object.__setattr__(self, field.name, value.detach())

    @property
    def batch_size(self) -> int:
        return len(self.num_ground_truth)

    def totals(self) -> dict[str, float]:
        """Batch totals: counts summed over images, mean matched IoU, and the normalised losses."""
        num_positives = int(self.num_positives.sum())
        return {
            "num_ground_truth": int(self.num_ground_truth.sum()),
            "num_positives": num_positives,
            "num_negatives": int(self.num_negatives.sum()),
            "num_ignored": int(self.num_ignored.sum()),
            "num_forced_matches": int(self.num_forced_matches.sum()),
            "mean_matched_iou": float(self.matched_iou_sum.sum()) / max(1, num_positives),
            "loss_l": float(self.loss_l_sum.sum() / self.normalizer),
            "loss_c": float(self.loss_c_sum.sum() / self.normalizer),
        }

    def per_image(self) -> list[dict[str, float | int]]:
        """One dict per image; losses divided by the batch's N so they sum to the batch losses.

        Keys: loss_l, loss_c, num_ground_truth, num_positives, num_negatives, mean_matched_iou (0 when
        the image has no positives), num_forced_matches.
        """
        loss_l = (self.loss_l_sum / self.normalizer).tolist()
        loss_c = (self.loss_c_sum / self.normalizer).tolist()
        mean_iou = (self.matched_iou_sum / self.num_positives.clamp(min=1)).tolist()
        columns = zip(
            loss_l,
            loss_c,
            self.num_ground_truth.tolist(),
            self.num_positives.tolist(),
            self.num_negatives.tolist(),
            mean_iou,
            self.num_forced_matches.tolist(),
            strict=True,
        )
        keys = ("loss_l", "loss_c", "num_ground_truth", "num_positives", "num_negatives",
                "mean_matched_iou", "num_forced_matches")
        return [dict(zip(keys, values, strict=True)) for values in columns]

    def to(self, device: torch.device | str) -> MatchStats:
        """A copy with every tensor on `device`."""
        return MatchStats(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
