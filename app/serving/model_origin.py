"""Where the served weights came from, said once at start-up: the line an operator reads first in the log."""

from __future__ import annotations

import logging

import torch

from app.core.settings import Settings
from ssd_core.storage.checkpoint import LoadedCheckpoint
from ssd_core.storage.weights_file import read_card

__all__ = ["log_served_model", "weights_origin"]

logger = logging.getLogger(__name__)


def weights_origin(settings: Settings, checkpoint: LoadedCheckpoint | None) -> str | None:
    """Where the served weights came from, in words; None for a random initialisation."""
    if checkpoint is not None:
        return f"checkpoint version {checkpoint.meta['version']} in {settings.checkpoint_dir}"
    if settings.role == "server":  # serves nothing until the trainer's first checkpoint appears
        return f"the trainer's checkpoints in {settings.checkpoint_dir} (none yet: not ready until one appears)"
    if settings.serves_demo():
        held_out = read_card(settings.weights).get("held_out", {})
        return f"the demo model (held-out mAP@0.5 {held_out.get('map_50', 'unknown')} on synthetic shapes)"
    if settings.weights is not None:
        return f"SSD_WEIGHTS={settings.weights}"
    return None


def log_served_model(settings: Settings, device: torch.device, checkpoint: LoadedCheckpoint | None) -> None:
    """The start-up line that says what is served: model, classes, prior set, device and the weights' origin;
    a warning instead when the weights are random."""
    names = settings.object_class_names()
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    served = (f"serving {settings.model} with {len(names)} classes ({shown}), {settings.prior_set} priors, "
              f"on {device.type}")
    origin = weights_origin(settings, checkpoint)
    if origin is not None:
        logger.info("%s; weights from %s", served, origin)
    else:
        logger.warning(
            "%s; weights RANDOM: this model detects nothing until trained. Serve the demo model with `make serve` "
            "(no SSD_MODEL), or set SSD_WEIGHTS, or import ssd.pytorch weights with `ssd import`", served,
        )
