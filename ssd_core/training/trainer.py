"""The training step: SGD or AdamW with warm-up, optional gradient clipping, an optional EMA of the
weights and bfloat16 autocast on CUDA.

A step whose loss or gradient norm is not finite changes nothing: the optimizer does not step
(weights and momentum buffers stay bitwise as they were) and the BatchNorm running statistics the
forward pass updated are put back. Such steps are counted in `Trainer.skipped_steps`.

A finite gradient can still wreck the weights (an extreme learning rate turns them into values whose
predictions overflow). With `TrainConfig.verify_update` the updated model scores the batch once more
(eval mode, no gradients) and a non-finite loss undoes the update the same way; the service, which
publishes every step to clients, turns this on.

With `TrainConfig.ema` enabled the trainer keeps an exponential moving average of its weights
(`ssd_core.training.ema`), updated after every completed step (never by a skipped one): `published` is the
network to evaluate and serve, while the optimizer keeps training `module`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ssd_core.loss.criterion import LossCriterion
from ssd_core.loss.stats import MatchStats
from ssd_core.training.ema import EMAConfig, ModelEMA

__all__ = ["StepResult", "TrainConfig", "Trainer", "TrainerState"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and step settings.

    Attributes:
        lr: base learning rate, reached after the warm-up.
        optimizer: "sgd" (momentum SGD, the SSD paper's) or "adamw" (`torch.optim.AdamW`, default betas).
        momentum: SGD's momentum (SSD paper: 0.9); unused by AdamW.
        weight_decay: SGD's L2 penalty (SSD paper: 5e-4) or AdamW's decoupled decay.
        warmup_steps: the lr rises linearly from lr / warmup_steps (step 0) to lr (step
            warmup_steps - 1); 0 disables the warm-up.
        clip_grad_norm: clip the global gradient L2 norm to this value; None disables clipping.
        amp: bfloat16 autocast for the forward pass on CUDA (ignored on other devices).
        verify_update: score the batch again after the update and skip the step (weights, buffers
            and optimizer state restored) when that loss is not finite; costs a copy of the weights
            and optimizer state and one forward pass per step.
        ema: the moving average of the weights that `Trainer.published` serves; off by default.
    """

    lr: float = 1e-3
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    clip_grad_norm: float | None = None
    amp: bool = False
    verify_update: bool = False
    ema: EMAConfig = field(default_factory=EMAConfig)

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm}")

    def lr_at(self, step: int) -> float:
        """Learning rate of completed-step count `step` (linear warm-up, then constant)."""
        return self.lr * self.warmup_factor(step)

    def warmup_factor(self, step: int) -> float:
        """The warm-up's share of the base rate at completed-step count `step`: (step + 1) / warmup_steps, then 1.
        A caller with its own base rate (a fine-tune job's learning_rate) multiplies it by this."""
        return 1.0 if step >= self.warmup_steps else (step + 1) / self.warmup_steps


@dataclass(frozen=True)
class StepResult:
    """Outcome of one `Trainer.step`.

    Attributes:
        loss_l, loss_c: the batch's loc and conf losses (NaN/inf possible when skipped).
        skipped: True when the loss or a gradient was not finite and nothing was updated.
        stats: the loss's match statistics for the batch.
        lr: learning rate used (or that would have been used, when skipped).
    """

    loss_l: float
    loss_c: float
    skipped: bool
    stats: MatchStats
    lr: float


class TrainerState(NamedTuple):
    """What a checkpoint holds of a trainer (`Trainer.state`, `Trainer.restore`).

    Attributes:
        weights: the published network's state dict (the EMA when enabled): what is served.
        optimizer_state: `optimizer.state_dict()`.
        training_weights: the optimizer's (raw) weights when they differ from `weights` (EMA on),
            else None.
    """

    weights: dict[str, Tensor]
    optimizer_state: dict[str, Any]
    training_weights: dict[str, Tensor] | None


def _same_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> bool:
    """Whether `state` (an `optimizer.state_dict()`) comes from the same kind of optimizer: the same
    hyper-parameter names in its param groups (SGD has `momentum`, AdamW `betas`)."""
    def names(groups: list[dict[str, Any]]) -> set[str]:
        return {key for group in groups for key in group if key != "params"}
    return names(state["param_groups"]) == names(optimizer.state_dict()["param_groups"])


def _to_device(targets: Tensor | list[Tensor], device: torch.device) -> Tensor | list[Tensor]:
    if isinstance(targets, Tensor):
        return targets.to(device)
    return [t.to(device) for t in targets]


class Trainer:
    """Owns a model and its optimizer (and the EMA of its weights) and runs training steps.

    Public attributes (nothing else holds state): `model`, `module`, `criterion`, `config`,
    `device`, `optimizer`, `ema` (a `ModelEMA` or None), `steps` (completed steps), `skipped_steps`.

    Args:
        model: an SSD (forward [B, 3, S, S] -> (loc, conf, priors)), or a wrapper of one such as
            `DistributedDataParallel`; moved to `device`. Steps run its forward pass.
        criterion: a `MultiBoxLoss` (anything with `compute`).
        config: optimizer settings.
        device: where to train.
        module: extension point for wrappers: the network inside `model` whose state dict (keys
            without a wrapper's prefix) `weights`, `state` and `restore` use; None means `model`.
        all_finite: extension point for data parallelism: turns this process's verdict (bool
            Tensor []: loss and gradient norm finite) into the step's; a step is skipped when it
            returns False. None means `bool`; `DistributedContext.all_true` makes the skip joint
            across ranks (called once per step on every rank).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: LossCriterion,
        config: TrainConfig,
        device: torch.device | str,
        *,
        module: nn.Module | None = None,
        all_finite: Callable[[Tensor], bool] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.module = self.model if module is None else module
        self.criterion = criterion
        self.config = config
        self._all_finite = bool if all_finite is None else all_finite
        if config.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                self.model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
            )
        self.ema = ModelEMA(self.module, config.ema) if config.ema.enabled else None
        self.steps = 0
        self.skipped_steps = 0

    @property
    def published(self) -> nn.Module:
        """The network to evaluate and serve: the EMA when enabled, else `module` itself."""
        return self.module if self.ema is None else self.ema.module

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(
        self, images: Tensor, targets: Tensor | list[Tensor], lr: float | None = None,
        class_mask: Tensor | None = None,
    ) -> StepResult:
        """One optimizer step on one batch (model in train mode).

        Args:
            images (Tensor[B, 3, S, S]): normalised input batch.
            targets: per image Tensor[n_i, 5 | 6] (x1, y1, x2, y2 normalised, label 0-based,
                optional difficult flag) or a padded Tensor[B, M, 6] (see `targets.pad_targets`).
            lr: learning rate for this step; None uses the warm-up schedule at `self.steps`.
            class_mask (Tensor[B, C] bool, optional): partial labels, passed to the criterion's
                `compute` (see `ssd_core.loss.partial_labels.labelled_class_mask`); None: fully labelled.

        Returns:
            StepResult; when `skipped`, weights, buffers and optimizer state are unchanged.
        """
        lr = self.config.lr_at(self.steps) if lr is None else lr
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.model.train()
        buffers = [b.clone() for b in self.model.buffers()]  # forward updates BatchNorm statistics
        self.optimizer.zero_grad(set_to_none=True)
        try:
            output, grad_norm = self._forward_backward(images, targets, class_mask)
        except BaseException:  # e.g. invalid targets: leave the model as it was
            self._undo_forward(buffers)
            raise
        loss = output.loss_l + output.loss_c
        finite = self._all_finite(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if finite:
            if self.config.clip_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(
                    self.model.parameters(), self.config.clip_grad_norm, grad_norm
                )
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            before = self._snapshot() if self.config.verify_update else None
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if before is not None and not self._scores_finite(images, targets, class_mask):
                self._restore(*before)
                finite = False
            else:
                self.steps += 1
                if self.ema is not None:
                    self.ema.update(self.module)
        if not finite:
            self._undo_forward(buffers)
            self.skipped_steps += 1
        return StepResult(
            float(output.loss_l.detach()), float(output.loss_c.detach()), not finite, output.stats, lr
        )

    def _forward_backward(
        self, images: Tensor, targets: Tensor | list[Tensor], class_mask: Tensor | None
    ) -> tuple[Any, Tensor]:
        """Loss and gradients of one batch -> (LossOutput, global gradient L2 norm [])."""
        with self._autocast():
            loc, conf, priors = self.model(images.to(self.device))  # [B, P, 4], [B, P, C], [P, 4]
        output = self.criterion.compute(
            (loc.float(), conf.float(), priors), _to_device(targets, self.device), class_mask
        )
        (output.loss_l + output.loss_c).backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        return output, grad_norm

    def _snapshot(self) -> tuple[list[Tensor], dict[str, Any]]:
        """Copies of the parameters and the optimizer state, for `_restore`."""
        parameters = [p.detach().clone() for p in self.model.parameters()]
        return parameters, copy.deepcopy(self.optimizer.state_dict())

    def _restore(self, parameters: list[Tensor], optimizer_state: dict[str, Any]) -> None:
        with torch.no_grad():
            for parameter, saved in zip(self.model.parameters(), parameters, strict=True):
                parameter.copy_(saved)
        self.optimizer.load_state_dict(optimizer_state)

    @torch.no_grad()
    def _scores_finite(self, images: Tensor, targets: Tensor | list[Tensor], class_mask: Tensor | None) -> bool:
        """Whether the (updated) model's loss on the batch is finite; eval mode leaves BatchNorm alone."""
        self.model.eval()
        try:
            with self._autocast():
                loc, conf, priors = self.model(images.to(self.device))  # [B, P, 4], [B, P, C], [P, 4]
            output = self.criterion.compute(
                (loc.float(), conf.float(), priors), _to_device(targets, self.device), class_mask
            )
        finally:
            self.model.train()
        return bool(torch.isfinite(output.loss_l + output.loss_c))

    def _undo_forward(self, buffers: list[Tensor]) -> None:
        """Drop the gradients and put back the buffers (BatchNorm statistics) saved before the forward."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
                buffer.copy_(saved)

    def weights(self) -> dict[str, Tensor]:
        """A detached CPU copy of `published`'s state dict (e.g. to publish a new serving version)."""
        return {name: t.detach().to("cpu", copy=True) for name, t in self.published.state_dict().items()}

    def state(self) -> TrainerState:
        """The published weights, optimizer state and (EMA on) the raw weights, for `CheckpointStore.save`;
        `steps` goes in meta. Live tensors: the store copies them."""
        training_weights = None if self.ema is None else self.module.state_dict()
        return TrainerState(self.published.state_dict(), self.optimizer.state_dict(), training_weights)

    def restore(
        self,
        weights: dict[str, Tensor],
        optimizer_state: dict[str, Any] | None,
        steps: int,
        training_weights: dict[str, Tensor] | None = None,
    ) -> None:
        """Resume from a checkpoint (`TrainerState`'s fields) and its completed step count.

        With the EMA on, the average resumes from `weights` and `module` from `training_weights`
        (from `weights` when the checkpoint has none, e.g. one written with the EMA off); the ramp
        resumes at `steps`. With the EMA off `module` takes `weights`, the published ones, and
        `training_weights` is ignored, so the trainer continues from what is served. An optimizer state
        of another kind of optimizer (an SGD checkpoint resumed with AdamW) is not loaded: the
        optimizer starts fresh (logged).
        """
        if self.ema is None:
            self.module.load_state_dict(weights)
        else:
            self.module.load_state_dict(weights if training_weights is None else training_weights)
            self.ema.load_state_dict(weights, updates=steps)
        if optimizer_state is not None and _same_optimizer(self.optimizer, optimizer_state):
            self.optimizer.load_state_dict(optimizer_state)
        elif optimizer_state is not None:
            logger.warning("the checkpoint's optimizer state belongs to another optimizer than %s: starting it "
                           "fresh", type(self.optimizer).__name__)
        self.steps = steps
