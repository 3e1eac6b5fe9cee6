"""SSD MultiBoxLoss (arXiv 1512.02325; ssd.pytorch's design, Caffe SSD's options), fully batched.

L = (L_conf + alpha * L_loc) / N with N = max(1, positives in the batch). Per image: match priors to
truths (`ssd_core.loss.matching`), Smooth L1 on the positives' encoded offsets, cross-entropy on the
positives plus negatives (hard-mined at `neg_pos` negatives per positive, or all eligible ones).

Rules beyond ssd.pytorch, following Caffe's MultiBoxLossParameter:
  * a prior is eligible as a negative only if unmatched and its best IoU with any truth is below
    `neg_overlap`; unmatched priors at or above it are ignored;
  * difficult truths (6th target column != 0) take part in matching, but priors matched to them are
    not positives, and priors whose IoU with a difficult truth is >= `neg_overlap` are not negatives;
  * an image without truths contributes nothing (no positives, hence no negatives, in every mode).

With a class mask (`compute(..., class_mask=)`, see `ssd_core.loss.partial_labels`) an image's confidence
loss, positives, negatives and hard-negative ranking alike, uses the softmax over the background and
its declared classes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssd_core.loss.loss_kernels import hardest_negatives, kernels_apply
from ssd_core.loss.matching import MATCH_TYPES, MatchResult, match, pairwise_iou
from ssd_core.loss.partial_labels import check_declared, class_mask_bias
from ssd_core.loss.selected_cross_entropy import SelectedCrossEntropy, background_log_prob
from ssd_core.loss.stats import ClassStats, MatchStats
from ssd_core.loss.targets import pad_targets
from ssd_core.ops.boxes import point_form
from ssd_core.ops.coder import decode, encode

__all__ = ["LossOutput", "MultiBoxLoss"]


class LossOutput(NamedTuple):
    """Both normalised losses (0-dim, float32 or float64) and the batch's match statistics."""

    loss_l: Tensor
    loss_c: Tensor
    stats: MatchStats


class _Selection(NamedTuple):
    """Selected priors as (image, prior) index pairs, image by image: positives [Kp], negatives [Kn];
    and per image the positives and the negative-eligible priors (Tensor[B] long each)."""

    pos_image: Tensor
    pos_prior: Tensor
    neg_image: Tensor
    neg_prior: Tensor
    num_positives: Tensor
    num_eligible: Tensor


class MultiBoxLoss(nn.Module):
    """SSD multibox loss with ssd.pytorch's constructor (`MultiBoxLoss.ssd_pytorch`: its default arguments).

    Args:
        num_classes: columns of conf, background included.
        overlap_thresh: IoU at or above which a prior is matched to its best truth, in (0, 1].
        prior_for_matching: match truths against the priors (True) or against the decoded, detached
            predicted boxes (False). Targets are always encoded against the priors.
        bkg_label: index of the background class in conf; object label l maps to l if l < bkg_label
            else l + 1.
        neg_mining: hard negative mining (True) or every eligible unmatched prior as a negative.
        neg_pos: negatives per positive when mining (clamped to P - 1 per image), >= 0.
        neg_overlap: unmatched priors with best IoU >= this are ignored, in (0, 1].
        encode_target: Caffe's encode_variance_in_target: loc predicts raw offsets (variance 1),
            and predictions and targets are both divided by the variance before Smooth L1.
        use_gpu: accepted for compatibility; computation follows the device of the inputs.
        variance: (center, size) variances of the box coder.
        loc_weight: alpha, the weight of the loc loss.
        match_type: "per_prediction" (ssd.pytorch: forced best prior per truth, later truth wins, then the
            threshold) or "bipartite" (Caffe's greedy bipartite step, then the threshold).
    """

    def __init__(
        self,
        num_classes: int,
        overlap_thresh: float,
        prior_for_matching: bool,
        bkg_label: int,
        neg_mining: bool,
        neg_pos: float,
        neg_overlap: float,
        encode_target: bool,
        use_gpu: bool = True,
        *,
        variance: Sequence[float] = (0.1, 0.2),
        loc_weight: float = 1.0,
        match_type: str = "per_prediction",
    ) -> None:
        super().__init__()
        _check_options(num_classes, overlap_thresh, bkg_label, neg_pos, neg_overlap, variance, loc_weight, match_type)
        self.num_classes = int(num_classes)
        self.threshold = float(overlap_thresh)
        self.use_prior_for_matching = bool(prior_for_matching)
        self.background_label = int(bkg_label)
        self.do_neg_mining = bool(neg_mining)
        self.negpos_ratio = neg_pos
        self.neg_overlap = float(neg_overlap)
        self.encode_target = bool(encode_target)
        self.use_gpu = use_gpu
        self.variance = (float(variance[0]), float(variance[1]))
        self.loc_weight = float(loc_weight)
        self.match_type = match_type

    @classmethod
    def ssd_pytorch(cls, num_classes: int, **options) -> MultiBoxLoss:
        """ssd.pytorch's training criterion, `MultiBoxLoss(num_classes, 0.5, True, 0, True, 3, 0.5, False)`:
        overlap_thresh 0.5, matching against the priors, background label 0, hard negative mining at 3
        negatives per positive, neg_overlap 0.5, no encode_target.

        Args:
            num_classes: columns of conf, background included.
            options: `use_gpu` and the keyword-only options (`variance`, `loc_weight`, `match_type`).
        """
        return cls(num_classes, 0.5, True, 0, True, 3, 0.5, False, **options)

    def forward(
        self, predictions: tuple[Tensor, Tensor, Tensor], targets: Tensor | Sequence[Tensor],
        class_mask: Tensor | None = None,
    ):
        """ssd.pytorch's interface: `(loss_l, loss_c)`; see `compute`."""
        output = self.compute(predictions, targets, class_mask)
        return output.loss_l, output.loss_c

    def compute(
        self, predictions: tuple[Tensor, Tensor, Tensor], targets: Tensor | Sequence[Tensor],
        class_mask: Tensor | None = None,
    ) -> LossOutput:
        """Both losses and the match statistics.

        Args:
            predictions: loc (Tensor[B, P, 4]) offsets, conf (Tensor[B, P, C]) logits, priors
                (Tensor[P, 4]) in normalised (cx, cy, w, h).
            targets: list of B Tensor[n_i, 5|6] or padded Tensor[B, M, 5|6]: (x1, y1, x2, y2)
                normalised, 0-based label without background (< 0 = padding), optional difficult flag.
            class_mask (Tensor[B, C] bool, optional): partial labels: the conf columns each image's
                softmax uses (the background column always); `partial_labels.labelled_class_mask` builds
                it from 0-based labels. Every real truth's class must be used. None: every column.

        Returns:
            LossOutput(loss_l, loss_c, stats); the losses are computed in float32 (float64 inputs stay
            float64), also under autocast or with float16/bfloat16 inputs.
        """
        loc, conf, priors = predictions
        self._check_shapes(loc, conf, priors)
        dtype = torch.promote_types(loc.dtype, torch.float32)
        with torch.autocast(device_type=loc.device.type, enabled=False):
            truths = pad_targets(targets, self.num_classes, device=loc.device, dtype=dtype)  # [B, M, 6]
            if truths.shape[0] != loc.shape[0]:
                raise ValueError(f"targets hold {truths.shape[0]} images, loc has batch size {loc.shape[0]}")
            bias = None if class_mask is None else self._mask_bias(class_mask, conf, dtype)  # [B, C]
            return self._loss(loc.to(dtype), conf.to(dtype), priors.to(loc.device, dtype), truths, bias)

    def _check_shapes(self, loc: Tensor, conf: Tensor, priors: Tensor) -> None:
        if loc.dim() != 3 or loc.shape[2] != 4:
            raise ValueError(f"loc must be [B, P, 4], got {tuple(loc.shape)}")
        if conf.dim() != 3 or conf.shape[2] != self.num_classes:
            raise ValueError(f"conf must be [B, P, num_classes={self.num_classes}], got {tuple(conf.shape)}")
        if conf.shape[:2] != loc.shape[:2]:
            raise ValueError(f"conf {tuple(conf.shape)} and loc {tuple(loc.shape)} differ in B or P")
        if priors.dim() != 2 or priors.shape != (loc.shape[1], 4):
            raise ValueError(f"priors must be [P={loc.shape[1]}, 4] like loc, got {tuple(priors.shape)}")

    def _mask_bias(self, class_mask: Tensor, conf: Tensor, dtype: torch.dtype) -> Tensor:
        """Logit bias [B, C] of a class mask: 0 where used, -inf elsewhere."""
        if class_mask.dtype != torch.bool or class_mask.shape != (conf.shape[0], conf.shape[2]):
            raise ValueError(f"class_mask must be bool [B={conf.shape[0]}, C={conf.shape[2]}], "
                             f"got {class_mask.dtype} {tuple(class_mask.shape)}")
        return class_mask_bias(class_mask.to(conf.device), self.background_label, dtype)

    @property
    def _loc_variance(self) -> tuple[float, float]:
        """Variance the predictions and the targets are encoded with."""
        return (1.0, 1.0) if self.encode_target else self.variance

    def _loss(self, loc: Tensor, conf: Tensor, priors: Tensor, truths: Tensor, bias: Tensor | None) -> LossOutput:
        """`compute` on padded truths [B, M, 6]; `bias` [B, C] is the class mask's logit bias or None."""
        boxes, valid = truths[..., :4], truths[..., 4] >= 0  # [B, M, 4], [B, M]
        difficult = valid & (truths[..., 5] != 0)  # [B, M]
        object_labels = truths[..., 4].long().clamp(min=0)  # [B, M], padding -> 0
        truth_columns = object_labels + (object_labels >= self.background_label)  # [B, M], background skipped
        if bias is not None:
            check_declared(truths[..., 4], truth_columns, valid, bias)
        if self.use_prior_for_matching:
            iou = pairwise_iou(boxes, valid, point_form(priors))  # [B, M, P]
        else:
            iou = pairwise_iou(boxes, valid, decode(loc.detach(), priors, self._loc_variance))  # [B, M, P]
        matches = match(iou, valid, self.threshold, self.match_type)
        selection = self._select(conf, matches, iou, valid, difficult, bias)
        pos_image, pos_prior, neg_image = selection.pos_image, selection.pos_prior, selection.neg_image
        pos_truth = matches.truth_idx[pos_image, pos_prior]  # [Kp]
        # the selected priors, positives then negatives (disjoint); the positives' class column, else background
        image, prior = torch.cat((pos_image, neg_image)), torch.cat((pos_prior, selection.neg_prior))  # [K] each
        negative_target = neg_image.new_full(neg_image.shape, self.background_label)  # [Kn]
        target = torch.cat((truth_columns[pos_image, pos_truth], negative_target))  # [K]
        row_bias = None if bias is None else bias[image]  # [K, C]
        cross_entropy = SelectedCrossEntropy.apply(conf, image * conf.shape[1] + prior, target, row_bias)  # [K]
        loss_c_sum = conf.new_zeros(conf.shape[0]).index_add(0, image, cross_entropy)  # [B]
        loc_loss = self._loc_loss(loc, priors, boxes[pos_image, pos_truth], pos_image, pos_prior)  # [Kp]
        loss_l_sum = loc.new_zeros(loc.shape[0]).index_add(0, pos_image, loc_loss)  # [B]

        normalizer = loc.new_tensor(max(1, len(pos_image)))
        matched_ious = matches.matched_iou[pos_image, pos_prior]  # [Kp]
        forced = valid & ~difficult & (matches.truth_best_iou < self.threshold)  # [B, M]
        num_ground_truth = valid.sum(dim=1)  # [B]
        num_positives = selection.num_positives
        # positive and eligible are disjoint, and both empty in an image without truths
        num_ignored = (num_ground_truth > 0) * loc.shape[1] - num_positives - selection.num_eligible
        per_class = self._class_stats(
            object_labels[valid], object_labels[forced], object_labels[pos_image, pos_truth], matched_ious,
            loc_loss, target, cross_entropy, normalizer,
        )
        stats = MatchStats(
            num_ground_truth=num_ground_truth,
            num_positives=num_positives,
            num_negatives=neg_image.bincount(minlength=loc.shape[0]),
            num_ignored=num_ignored,
            num_forced_matches=forced.sum(dim=1),
            matched_iou_sum=matched_ious.new_zeros(loc.shape[0]).index_add_(0, pos_image, matched_ious),
            loss_l_sum=loss_l_sum,
            loss_c_sum=loss_c_sum,
            matched_ious=matched_ious,
            normalizer=normalizer,
            per_class=per_class,
        )
        return LossOutput(loss_l_sum.sum() / normalizer, loss_c_sum.sum() / normalizer, stats)

    def _class_stats(
        self, truth_labels: Tensor, forced_labels: Tensor, positive_labels: Tensor, matched_ious: Tensor,
        loc_loss: Tensor, target: Tensor, cross_entropy: Tensor, normalizer: Tensor,
    ) -> ClassStats:
        """Per-class sums by bincount / index_add over what the loss holds: O(truths + selected priors).

        Args:
            truth_labels (Tensor[N] long): 0-based labels of the real truths; forced_labels (Tensor[F]) of
                those matched only by the forced step.
            positive_labels, matched_ious, loc_loss (Tensor[Kp] each): per positive prior.
            target, cross_entropy (Tensor[K] each): conf column and loss of every selected prior.
        """
        num_labels, background = self.num_classes - 1, self.background_label
        per_column = cross_entropy.new_zeros(self.num_classes).index_add_(0, target, cross_entropy.detach())  # [C]

        def per_label(values: Tensor) -> Tensor:  # [Kp] -> [L]
            return values.new_zeros(num_labels).index_add_(0, positive_labels, values.detach())

        return ClassStats(
            num_ground_truth=truth_labels.bincount(minlength=num_labels),
            num_positives=positive_labels.bincount(minlength=num_labels),
            num_forced_matches=forced_labels.bincount(minlength=num_labels),
            matched_iou_sum=per_label(matched_ious),
            loss_l_sum=per_label(loc_loss),
            loss_c_sum=torch.cat((per_column[:background], per_column[background + 1 :])),
            negative_loss_c_sum=per_column[background],
            normalizer=normalizer,
        )

    def _select(
        self, conf: Tensor, matches: MatchResult, iou: Tensor, valid: Tensor, difficult: Tensor, bias: Tensor | None
    ) -> _Selection:
        """The priors of the loss: positives, and negatives mined (or all eligible ones)."""
        positive, eligible = self._assign(matches, iou, valid, difficult)  # [B, P] each
        pos_image, pos_prior = positive.nonzero(as_tuple=True)  # [Kp] each
        num_positives = pos_image.bincount(minlength=conf.shape[0])  # [B]
        if self.do_neg_mining:
            background = background_log_prob(conf.detach(), self.background_label, bias)  # [B, P], minus the loss
            neg_image, neg_prior = self._mine(background, num_positives, eligible)  # [Kn] each
        else:
            neg_image, neg_prior = eligible.nonzero(as_tuple=True)  # [Kn] each
        return _Selection(pos_image, pos_prior, neg_image, neg_prior, num_positives, eligible.sum(dim=1))

    def _assign(self, matches: MatchResult, iou: Tensor, valid: Tensor, difficult: Tensor) -> tuple[Tensor, Tensor]:
        """Positives and negative-eligible priors, both Tensor[B, P] bool."""
        eligible = ~matches.matched & (matches.best_iou < self.neg_overlap) & valid.any(dim=1, keepdim=True)
        if not difficult.any():  # the common case: no [B, P] gather
            return matches.matched, eligible
        positive = matches.matched & ~difficult.gather(1, matches.truth_idx)  # [B, P]
        near_difficult = iou.masked_fill(~difficult[:, :, None], 0.0).amax(dim=1) >= self.neg_overlap  # [B, P]
        return positive, eligible & ~near_difficult

    def _mine(self, background_log_prob: Tensor, num_positives: Tensor, eligible: Tensor) -> tuple[Tensor, Tensor]:
        """Hard negatives: per image the num_neg eligible priors of highest conf loss (lowest background
        log-probability); num_neg = min(neg_pos * positives, P - 1) per image, as in ssd.pytorch. On the CPU a
        compiled heap per image (`loss_kernels`; equal losses go to the lower prior), elsewhere one topk for
        the whole batch.

        Args:
            background_log_prob (Tensor[B, P]); num_positives (Tensor[B] long); eligible (Tensor[B, P] bool).

        Returns:
            (image, prior) of the negatives, Tensor[Kn] long each, image by image.
        """
        num_priors = eligible.shape[1]
        num_neg = (num_positives * self.negpos_ratio).floor().long().clamp(max=num_priors - 1)  # [B]
        if kernels_apply(background_log_prob):
            return hardest_negatives(background_log_prob, eligible, num_neg)
        k = int(num_neg.max()) if num_neg.numel() else 0
        ranked = torch.where(eligible, background_log_prob, float("inf"))  # [B, P]
        values, index = ranked.topk(k, dim=1, largest=False)  # [B, k]
        take = (torch.arange(k, device=ranked.device) < num_neg[:, None]) & (values < float("inf"))  # [B, k]
        image, rank = take.nonzero(as_tuple=True)  # [Kn] each
        return image, index[image, rank]

    def _loc_loss(self, loc: Tensor, priors: Tensor, matched: Tensor, image: Tensor, prior: Tensor) -> Tensor:
        """loc_weight * Smooth L1 of each positive, Tensor[K] (not normalised).

        Args:
            matched (Tensor[K, 4]): each positive's truth in (x1, y1, x2, y2); image, prior (Tensor[K]).
        """
        target = encode(matched, priors[prior], self._loc_variance)  # [K, 4]
        predicted = loc[image, prior]  # [K, 4]
        if self.encode_target:
            v_center, v_size = self.variance
            scale = loc.new_tensor([v_center, v_center, v_size, v_size])
            predicted, target = predicted / scale, target / scale
        return F.smooth_l1_loss(predicted, target, reduction="none").sum(dim=1) * self.loc_weight  # [K]


def _check_options(
    num_classes: int,
    overlap_thresh: float,
    bkg_label: int,
    neg_pos: float,
    neg_overlap: float,
    variance: Sequence[float],
    loc_weight: float,
    match_type: str,
) -> None:
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (background included), got {num_classes}")
    for name, value in (("overlap_thresh", overlap_thresh), ("neg_overlap", neg_overlap)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    if int(bkg_label) != bkg_label or not 0 <= bkg_label < num_classes:
        raise ValueError(f"bkg_label must be a class index in [0, {num_classes - 1}], got {bkg_label}")
    if not neg_pos >= 0 or neg_pos == float("inf"):
        raise ValueError(f"neg_pos must be a finite number >= 0, got {neg_pos}")
    if len(variance) != 2 or not all(0.0 < v < float("inf") for v in variance):
        raise ValueError(f"variance must be two positive finite numbers, got {tuple(variance)}")
    if not 0.0 <= loc_weight < float("inf"):
        raise ValueError(f"loc_weight must be a finite number >= 0, got {loc_weight}")
    if match_type not in MATCH_TYPES:
        raise ValueError(f"match_type must be one of {MATCH_TYPES}, got {match_type!r}")
