"""The loss's hot loops on the CPU, compiled (numba): matching's two passes over [B, M, P] (the IoU of each image's
truths with the priors, every prior's best truth) and the hard-negative selection.

Measured at B = 32, 136 truths, P = 8732, 1 thread (`benchmarks/bench_loss.py`):
  * the IoU took 4-10 ms as torch's element-wise ops (a dozen passes over [K, P] and a scatter into the padded
    [B, M, P]) against 0.3 ms here, one vectorised sweep per truth that writes its row once; its arithmetic is
    torch's, in the same order and precision, so the values are bitwise equal (tested);
  * the best truth, `amax` plus `argmax` of the priors above the threshold (torch's `max` with indices along the
    short truths axis is slow), 0.8 ms against 0.5 ms in one pass;
  * the hard negatives, a `topk` of the largest count over [B, P] (C = 21: k of about 200), 2.6 ms against
    0.3 ms for a bounded heap per image that most priors leave after one comparison.

The loops are compiled on their first call in a process (the first loss takes about 2 s longer; float64 compiles
again), not cached on disk: the service's image and pods may not have a writable cache directory. They release
the GIL.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

__all__ = ["best_truth_of_priors", "hardest_negatives", "kernels_apply", "truth_prior_iou"]

_DTYPES = (torch.float32, torch.float64)


def kernels_apply(*tensors: Tensor, finite: bool = False) -> bool:
    """Whether the compiled loops take these tensors: on the CPU, float32 or float64 (one dtype), and with
    `finite` (what the IoU loop needs: its min/max ignore NaN to vectorise) without NaN or infinity."""
    first = tensors[0]
    return (
        all(t.device.type == "cpu" and t.dtype == first.dtype for t in tensors)
        and first.dtype in _DTYPES
        and (not finite or all(bool(torch.isfinite(t).all()) for t in tensors))
    )


def truth_prior_iou(truths: Tensor, valid: Tensor, boxes: Tensor) -> Tensor:
    """`matching.pairwise_iou` on the CPU, the same arguments and result: truths (Tensor[B, M, 4]) and boxes
    (Tensor[P, 4] shared, or Tensor[B, P, 4]) in (x1, y1, x2, y2), valid (Tensor[B, M] bool) -> Tensor[B, M, P], -1
    in padding rows. Check `kernels_apply(truths, boxes, finite=True)` first.
    """
    per_image = boxes if boxes.dim() == 3 else boxes[None]  # [B or 1, P, 4]
    corners = np.ascontiguousarray(per_image.detach().numpy().transpose(0, 2, 1))  # [B or 1, 4, P]
    out = np.empty((*truths.shape[:2], boxes.shape[-2]), dtype=corners.dtype)  # [B, M, P]
    _truth_prior_iou(np.ascontiguousarray(truths.detach().numpy()), valid.numpy(), corners, out)
    return torch.from_numpy(out)


def best_truth_of_priors(iou: Tensor) -> tuple[Tensor, Tensor]:
    """Every prior's highest IoU over the truths and the first truth that has it: `iou.max(dim=1)` (a NaN IoU
    wins, as there). CPU float32/float64 only.

    Args:
        iou (Tensor[B, M, P]) with M >= 1.

    Returns:
        (Tensor[B, P], Tensor[B, P] long).
    """
    values = np.ascontiguousarray(iou.detach().numpy())
    best = np.empty((iou.shape[0], iou.shape[2]), dtype=values.dtype)  # [B, P]
    index = np.empty(best.shape, dtype=np.int64)  # [B, P]
    _best_truth_of_priors(values, best, index)
    return torch.from_numpy(best), torch.from_numpy(index)


def hardest_negatives(background_log_prob: Tensor, eligible: Tensor, num_neg: Tensor) -> tuple[Tensor, Tensor]:
    """Per image the `num_neg` eligible priors of lowest background log-probability (highest conf loss), in that
    order; equal values go to the lower prior index. Priors whose value is NaN or +inf are never taken.

    Args:
        background_log_prob (Tensor[B, P]) float32 or float64; eligible (Tensor[B, P] bool); num_neg (Tensor[B] long).

    Returns:
        (image, prior) of the negatives, Tensor[Kn] long each, image by image.
    """
    counts = num_neg.numpy()
    image = np.empty(int(counts.sum()), dtype=np.int64)  # [at most sum num_neg]
    prior = np.empty_like(image)
    found = _hardest_negatives(np.ascontiguousarray(background_log_prob.detach().numpy()),
                               np.ascontiguousarray(eligible.numpy()), counts, image, prior)
    return torch.from_numpy(image[:found]), torch.from_numpy(prior[:found])


# min/max vectorise only when NaN may be ignored ("nnan"), hence finite inputs only; division stays exact
# (no "arcp"), and nothing is contracted or reassociated, so every value is torch's
@numba.njit(nogil=True, error_model="numpy", fastmath={"nnan", "ninf"})
def _truth_prior_iou(truths, valid, corners, out):
    batch, num_truths, num_priors = out.shape
    zero = out.dtype.type(0)
    for b in range(batch):
        image = b if corners.shape[0] > 1 else 0
        x1b, y1b, x2b, y2b = corners[image, 0], corners[image, 1], corners[image, 2], corners[image, 3]  # [P] each
        for m in range(num_truths):
            row = out[b, m]  # [P]
            if not valid[b, m]:
                for p in range(num_priors):
                    row[p] = -1
                continue
            x1, y1, x2, y2 = truths[b, m, 0], truths[b, m, 1], truths[b, m, 2], truths[b, m, 3]
            area = (x2 - x1) * (y2 - y1)
            for p in range(num_priors):
                width = max(min(x2, x2b[p]) - max(x1, x1b[p]), zero)
                height = max(min(y2, y2b[p]) - max(y1, y1b[p]), zero)
                inter = width * height
                row[p] = inter / ((area + (x2b[p] - x1b[p]) * (y2b[p] - y1b[p])) - inter)


@numba.njit(nogil=True, error_model="numpy")
def _best_truth_of_priors(iou, best, index):
    batch, num_truths, num_priors = iou.shape
    for b in range(batch):
        best_b, index_b, first = best[b], index[b], iou[b, 0]  # [P] each
        for p in range(num_priors):
            best_b[p] = first[p]
            index_b[p] = 0
        for m in range(1, num_truths):
            row = iou[b, m]  # [P]
            for p in range(num_priors):
                value, held = row[p], best_b[p]
                better = value > held or (value != value and held == held)  # the first NaN wins, as in max
                best_b[p] = value if better else held
                index_b[p] = m if better else index_b[p]


@numba.njit(nogil=True)
def _hardest_negatives(values, eligible, counts, image_out, prior_out):
    """Fill image_out/prior_out image by image; returns how many were written. Per image a max-heap of the
    `counts[b]` smallest (value, prior) keys seen so far: a later prior with an equal value has the larger key."""
    batch, num_priors = values.shape
    heap_value = np.empty(max(1, counts.max()) if batch else 1, dtype=values.dtype)
    heap_prior = np.empty(heap_value.shape[0], dtype=np.int64)
    written = 0
    for b in range(batch):
        wanted, size = counts[b], 0
        if wanted <= 0:
            continue
        for p in range(num_priors):
            value = values[b, p]
            if not eligible[b, p] or not value < np.inf:
                continue
            if size < wanted:
                _sift_up(heap_value, heap_prior, size, value, p)
                size += 1
            elif value < heap_value[0]:
                _sift_down(heap_value, heap_prior, 0, size, value, p)
        for end in range(size - 1, 0, -1):  # heapsort: ascending keys
            value, index = heap_value[end], heap_prior[end]
            heap_value[end], heap_prior[end] = heap_value[0], heap_prior[0]
            _sift_down(heap_value, heap_prior, 0, end, value, index)
        for i in range(size):
            image_out[written], prior_out[written] = b, heap_prior[i]
            written += 1
    return written


@numba.njit(inline="always")
def _greater(value_a, prior_a, value_b, prior_b):
    return value_a > value_b or (value_a == value_b and prior_a > prior_b)


@numba.njit(inline="always")
def _sift_up(heap_value, heap_prior, at, value, prior):
    """Place (value, prior) at slot `at` of the heap [0, at] and move it up to its place."""
    while at > 0:
        parent = (at - 1) >> 1
        if not _greater(value, prior, heap_value[parent], heap_prior[parent]):
            break
        heap_value[at], heap_prior[at] = heap_value[parent], heap_prior[parent]
        at = parent
    heap_value[at], heap_prior[at] = value, prior


@numba.njit(inline="always")
def _sift_down(heap_value, heap_prior, at, size, value, prior):
    """Place (value, prior) at slot `at` of the heap [0, size) and move it down to its place."""
    while True:
        child = 2 * at + 1
        if child >= size:
            break
        if child + 1 < size and _greater(heap_value[child + 1], heap_prior[child + 1], heap_value[child],
                                         heap_prior[child]):
            child += 1
        if not _greater(heap_value[child], heap_prior[child], value, prior):
            break
        heap_value[at], heap_prior[at] = heap_value[child], heap_prior[child]
        at = child
    heap_value[at], heap_prior[at] = value, prior
