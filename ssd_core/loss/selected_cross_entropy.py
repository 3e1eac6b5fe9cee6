"""The conf loss's two passes over [B, P, C] logits without a [B, P, C] log-probability tensor: every prior's
background log-probability (to rank hard negatives), and the cross-entropy of the selected priors only
(with its own backward, which writes only those rows of d conf)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["SelectedCrossEntropy", "background_log_prob"]

# conf elements per log_softmax call on the CPU (4 MB of float32): no [B, P, C] log-probability tensor
# is allocated (a fresh 20-90 MB buffer costs more in page faults than the pass itself), while blocks
# stay large enough for two threads; measured best among 2^16..2^22 for C = 21 and 81
_ELEMENTS_PER_BLOCK = 2**20


def background_log_prob(conf: Tensor, background_label: int, bias: Tensor | None = None) -> Tensor:
    """log softmax(conf + bias)[..., background_label] of every prior, block by block of rows on the CPU.

    Args:
        conf (Tensor[B, P, C]): logits.
        bias (Tensor[B, C], optional): per-image logit bias (a class mask's 0 / -inf).

    Returns:
        Tensor[B, P]: each prior's background log-probability (minus its conf loss as a negative).
    """
    rows = conf.detach().reshape(-1, conf.shape[-1])  # [B * P, C]
    if bias is None and rows.device.type == "cpu" and rows.dtype in _NUMPY_DTYPES and torch.get_num_threads() == 1:
        return _background_log_prob_by_exp(rows, background_label).view(conf.shape[:2])
    block = max(1, _ELEMENTS_PER_BLOCK // rows.shape[1] if rows.device.type == "cpu" else len(rows))
    out = rows.new_empty(len(rows))  # [B * P]
    for start in range(0, len(rows), block):
        logits = rows[start : start + block]  # [n, C]
        if bias is not None:
            image = torch.arange(start, start + len(logits), device=rows.device) // conf.shape[1]  # [n]
            logits = logits + bias[image]
        out[start : start + block] = F.log_softmax(logits, dim=-1)[:, background_label]
    return out.view(conf.shape[:2])


# a row whose sum of exponentials is below this is computed again with log_softmax (its largest term could be
# subnormal), as is a row whose sum overflowed (a logit above 88 in float32) or is NaN
_LOG_SMALLEST_EXP_SUM = -69.0  # log(1e-30)


def _background_log_prob_by_exp(rows: Tensor, background_label: int) -> Tensor:
    """`background_log_prob` of CPU float32/float64 rows [N, C] without a bias: x_bg - log(sum_c exp(x_c)).

    One pass over the logits instead of log_softmax's three (maximum, sum of shifted exponentials, output):
    numpy's `exp` (twice torch's speed on this CPU) into a reused block, the row sums as a matrix-vector
    product, and the rest on [N] with numpy while the block is in cache. B = 32, P = 8732: 4.8 ms against
    8.2 ms at C = 21, 15 ms against 25 ms at C = 81, 1 thread. With two threads log_softmax splits its passes
    and numpy's exp runs on one: 5.0 against 6.1 ms at C = 21 but 14.8 against 13.4 ms at C = 81, hence only
    on 1 thread. Without the shift by the row maximum a logit above 88 (float32) overflows and a
    row of very negative logits underflows: those rows, and rows with non-finite logits, are computed again
    with log_softmax. Values agree with log_softmax to rounding.
    """
    num_classes = rows.shape[1]
    block = max(1, _ELEMENTS_PER_BLOCK // num_classes)
    log_sums = rows.new_empty(len(rows))  # [N]
    exps = rows.new_empty(min(block, len(rows)), num_classes)  # [block, C]
    ones = rows.new_ones(num_classes)  # [C]
    logits, exps_view, log_sums_view = rows.numpy(), exps.numpy(), log_sums.numpy()
    out = np.empty_like(log_sums_view)  # [N]
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):  # rows computed again
        for start in range(0, len(rows), block):
            end = min(start + block, len(rows))
            np.exp(logits[start:end], out=exps_view[: end - start])
            torch.mv(exps[: end - start], ones, out=log_sums[start:end])
            np.log(log_sums_view[start:end], out=log_sums_view[start:end])
            np.subtract(logits[start:end, background_label], log_sums_view[start:end], out=out[start:end])
    # NaN fails both comparisons
    redo = np.flatnonzero(~((log_sums_view >= _LOG_SMALLEST_EXP_SUM) & (log_sums_view < np.inf)))
    result = torch.from_numpy(out)
    if len(redo):
        index = torch.from_numpy(redo)
        result[index] = F.log_softmax(rows[index], dim=-1)[:, background_label]
    return result


class SelectedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of the selected priors only.

    Forward: log_softmax on the K selected rows of conf (plus a row bias [K, C] of 0 / -inf for a class
    mask), -log_probs[k, target[k]], Tensor[K]. Backward: softmax - one_hot written into those rows of a
    zero d conf (masked columns get 0); nothing else touches [B, P, C].
    """

    @staticmethod
    def forward(ctx, conf: Tensor, row: Tensor, target: Tensor, row_bias: Tensor | None) -> Tensor:
        logits = conf.reshape(-1, conf.shape[-1]).index_select(0, row)  # [K, C]
        if row_bias is not None:
            logits += row_bias
        log_probs = F.log_softmax(logits, dim=-1)  # [K, C]
        ctx.save_for_backward(log_probs, row, target)
        ctx.conf_shape = conf.shape
        return -log_probs.gather(1, target[:, None]).squeeze(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        log_probs, row, target = ctx.saved_tensors
        grad_rows = log_probs.exp()  # softmax, [K, C]
        grad_rows[torch.arange(len(target), device=target.device), target] -= 1
        return _zeros_but_rows(ctx.conf_shape, row, grad_rows.mul_(grad[:, None])), None, None, None


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _zeros_but_rows(shape: torch.Size, row: Tensor, values: Tensor) -> Tensor:
    """A tensor of `shape` [B, P, C], zero but for rows `row` (Tensor[K] long, distinct) of its [B * P, C] view,
    which hold `values` (Tensor[K, C]).

    On the CPU the zeros come from calloc (`numpy.zeros`, shared with the result, no copy): a large block is
    fresh pages that the kernel maps zeroed on first touch, so the pages of d conf that the backward never writes
    (all rows but the selected few) cost nothing unless read; `torch.zeros` writes every byte (at C = 81, B = 32,
    SSD300's 90 MB: 37 ms against 9 ms, 1 thread). The rows are written by numpy on one thread: with two, torch's
    `index_copy_` took the touched pages' first-write faults concurrently and ran 2-3x slower, in a range of
    6-27 ms at C = 81.
    """
    numpy_dtype = _NUMPY_DTYPES.get(values.dtype)
    if values.device.type != "cpu" or numpy_dtype is None:
        out = values.new_zeros(shape)
        out.view(-1, values.shape[1]).index_copy_(0, row, values)
        return out
    out = np.zeros(tuple(shape), dtype=numpy_dtype)
    out.reshape(-1, values.shape[1])[row.numpy()] = values.numpy()
    return torch.from_numpy(out)
