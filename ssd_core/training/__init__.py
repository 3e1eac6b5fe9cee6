"""Training: the optimizer step, the EMA of the weights, data-parallel training."""

from ssd_core.training.ema import EMAConfig, ModelEMA
from ssd_core.training.trainer import StepResult, TrainConfig, Trainer, TrainerState

__all__ = ["EMAConfig", "ModelEMA", "StepResult", "TrainConfig", "Trainer", "TrainerState"]
