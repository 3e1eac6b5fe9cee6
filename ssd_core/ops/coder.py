"""The SSD box coder: ground-truth boxes <-> offsets relative to the priors, with variances."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["decode", "encode"]


def encode(matched: Tensor, priors: Tensor, variances: Sequence[float] = (0.1, 0.2)) -> Tensor:
    """Encode matched ground-truth boxes as offsets from their priors (the regression target).

    Args:
        matched (Tensor[..., P, 4]): ground truth per prior in (x1, y1, x2, y2).
        priors (Tensor[P, 4] or Tensor[..., P, 4]): priors in (cx, cy, w, h), broadcast against `matched`.
        variances: (center, size) variances; (1, 1) gives the raw offsets.

    Returns:
        Tensor[..., P, 4]: (dcx, dcy, dw, dh) with
        dcx = (gcx - pcx) / (v0 * pw), dw = log(gw / pw) / v1.
    """
    g_cxcy = (matched[..., :2] + matched[..., 2:]) / 2 - priors[..., :2]
    g_cxcy = g_cxcy / (variances[0] * priors[..., 2:])
    g_wh = (matched[..., 2:] - matched[..., :2]) / priors[..., 2:]
    g_wh = torch.log(g_wh) / variances[1]
    return torch.cat((g_cxcy, g_wh), dim=-1)


def decode(loc: Tensor, priors: Tensor, variances: Sequence[float] = (0.1, 0.2)) -> Tensor:
    """Decode predicted offsets back to boxes; the exact inverse of `encode`.

    Args:
        loc (Tensor[..., P, 4]): predicted (dcx, dcy, dw, dh).
        priors (Tensor[P, 4] or Tensor[..., P, 4]): priors in (cx, cy, w, h).
        variances: (center, size) variances used by `encode`.

    Returns:
        Tensor[..., P, 4]: boxes in (x1, y1, x2, y2).
    """
    centers = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    sizes = priors[..., 2:] * torch.exp(loc[..., 2:] * variances[1])
    return torch.cat((centers - sizes / 2, centers + sizes / 2), dim=-1)
