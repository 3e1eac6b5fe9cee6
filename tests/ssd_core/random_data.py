"""Random inputs for the loss tests and the benchmark: priors, predictions and valid targets."""

from __future__ import annotations

import torch

from ssd_core.ops.priors import prior_boxes, scaled_prior_config

# 5x5, 3x3 and 1x1 maps: 4 * 25 + 6 * 9 + 4 = 158 priors, enough geometry to exercise matching
SMALL_PRIORS = scaled_prior_config(300, (5, 3, 1), ((2,), (2, 3), (2,)))


def small_priors() -> torch.Tensor:
    """Tensor[158, 4] priors in (cx, cy, w, h)."""
    return prior_boxes(SMALL_PRIORS)


def random_boxes(n: int, generator: torch.Generator, min_size: float = 0.03) -> torch.Tensor:
    """Tensor[n, 4] valid normalised boxes in (x1, y1, x2, y2)."""
    corner = torch.rand(n, 2, generator=generator) * (1 - min_size)
    size = min_size + torch.rand(n, 2, generator=generator) * (1 - min_size - corner)
    return torch.cat((corner, corner + size), dim=1)


def random_targets(batch: int, max_boxes: int, num_classes: int, generator: torch.Generator,
                   allow_empty: bool = True) -> list[torch.Tensor]:
    """B tensors [n_i, 5] (box, 0-based label), n_i in [0 or 1, max_boxes]."""
    low = 0 if allow_empty else 1
    targets = []
    for _ in range(batch):
        n = int(torch.randint(low, max_boxes + 1, (1,), generator=generator))
        labels = torch.randint(0, num_classes - 1, (n, 1), generator=generator).float()
        targets.append(torch.cat((random_boxes(n, generator), labels), dim=1))
    return targets


def random_predictions(batch: int, num_priors: int, num_classes: int, generator: torch.Generator,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """loc Tensor[B, P, 4] and conf Tensor[B, P, C], both requiring grad."""
    loc = torch.randn(batch, num_priors, 4, generator=generator, dtype=dtype).requires_grad_()
    conf = (2 * torch.randn(batch, num_priors, num_classes, generator=generator, dtype=dtype)).requires_grad_()
    return loc, conf
