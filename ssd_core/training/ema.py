"""Exponential moving average of a model's weights (ultralytics' `ModelEMA`).

The optimizer trains the raw weights; the average is what gets evaluated and served. After `updates`
completed steps the average moves by

    d = decay * (1 - exp(-updates / tau))
    ema = d * ema + (1 - d) * raw

for every floating-point entry of the state dict: parameters and BatchNorm's running mean and
variance alike, as ultralytics does. Integer entries (BatchNorm's `num_batches_tracked`) cannot be
averaged and are copied from the raw model. The ramp makes the first steps follow the raw weights
closely (d = 0 at the first update), so a fresh model is not held back by its random start; `tau` is
in steps: after 3 tau the decay is within 5 % of `decay`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["EMAConfig", "ModelEMA"]


@dataclass(frozen=True)
class EMAConfig:
    """EMA settings.

    Attributes:
        decay: the asymptotic decay in [0, 1); 0 disables the EMA (`enabled`).
        tau: steps of the ramp (> 0).
    """

    decay: float = 0.0
    tau: float = 2000.0

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    def decay_at(self, updates: int) -> float:
        """Decay applied by update number `updates` (1 for the first update)."""
        return self.decay * (1 - math.exp(-updates / self.tau))


class ModelEMA:
    """A frozen eval-mode copy of `model` whose weights follow it as an exponential moving average.

    Args:
        model: the trained network (not a DDP wrapper: its state-dict keys are the EMA's).
        config: decay and ramp.
        updates: completed updates so far (a resumed trainer's step count).

    Attributes:
        module: the averaged network (eval mode, no gradients), on `model`'s device.
        updates: how many times `update` ran.
    """

    def __init__(self, model: nn.Module, config: EMAConfig, updates: int = 0) -> None:
        if not config.enabled:
            raise ValueError(f"ModelEMA needs decay > 0, got {config.decay}")
        self.config = config
        self.updates = updates
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Move the average one step towards `model`'s current weights; returns the decay used."""
        self.updates += 1
        decay = self.config.decay_at(self.updates)
        raw = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(decay).add_(raw[name].detach(), alpha=1 - decay)
            else:
                value.copy_(raw[name])
        return decay

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged network's state dict (live tensors; copy before changing them)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Tensor], updates: int) -> None:
        """Set the average (e.g. from a checkpoint) and the update count of its ramp."""
        self.module.load_state_dict(state_dict)
        self.updates = updates
