"""What training and evaluation need from a loss: `MultiBoxLoss.compute`'s signature, as a Protocol."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor


class LossCriterion(Protocol):
    """What the trainer and the publish gate need from `MultiBoxLoss`."""

    def compute(
        self, predictions: tuple[Tensor, Tensor, Tensor], targets: Any, class_mask: Tensor | None = None
    ) -> Any:
        """(loc [B, P, 4], conf [B, P, C], priors [P, 4]), targets -> LossOutput(loss_l, loss_c, stats)."""
