"""The served model: immutable published versions, swapped atomically.

A `ModelVersion` is never mutated after publication: training works on its own copy of the
weights and publishes a fresh frozen copy, so a request that picked up version v computes with
version v's weights from start to finish. Publishing replaces one reference under a lock; readers
take the reference without locking (an attribute read is atomic).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import Tensor

from app.core.metrics import Metrics
from app.core.settings import Settings
from ssd_core.models import SSD, build_model
from ssd_core.models.devices import resolve_device
from ssd_core.storage.checkpoint import CheckpointStore, LoadedCheckpoint
from ssd_core.storage.checkpoint_meta import recorded_priors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVersion:
    """One published version: an eval-mode model that nothing writes to any more.

    Attributes:
        model: the network (eval mode, no gradients) on the host's device.
        version: its number; strictly increasing over the life of a checkpoint directory.
        step: completed training steps behind these weights.
        published_at: UNIX time of publication.
        restored_from: the saved version a rollback copied, else None.
    """

    model: SSD
    version: int
    step: int
    published_at: float
    restored_from: int | None = None


def frozen_copy(model: SSD, device: torch.device) -> SSD:
    """An independent eval-mode copy without gradients, safe to share between inference threads."""
    snapshot = copy.deepcopy(model).to(device).eval()
    for parameter in snapshot.parameters():
        parameter.grad = None
        parameter.requires_grad_(False)
    return snapshot


class ModelHost:
    """Holds the current `ModelVersion` and publishes new ones.

    Args:
        settings: architecture, classes, device.
        metrics: `ssd_model_version` and `ssd_model` info are kept current.
        model: initial weights (any device); the host keeps its own frozen copy.
        version, step: of those weights.
    """

    def __init__(self, settings: Settings, metrics: Metrics, model: SSD, version: int, step: int) -> None:
        self.settings = settings
        self.metrics = metrics
        self.device = resolve_device(settings.device, "SSD_DEVICE")
        self.spec = model.spec
        self.priors: Tensor = model.priors.to(self.device)  # [P, 4] cxcywh, the same for every version
        self._lock = threading.Lock()
        self._current = ModelVersion(frozen_copy(model, self.device), version, step, time.time())
        metrics.model_version.set(version)
        metrics.model.info({
            "architecture": settings.model, "num_classes": str(settings.num_classes), "device": str(self.device),
        })

    @property
    def current(self) -> ModelVersion:
        """The version to serve now; keep the returned object for the whole request."""
        return self._current

    def publish(
        self, model: SSD, step: int, restored_from: int | None = None, version: int | None = None
    ) -> ModelVersion:
        """Freeze a copy of `model` as the next version and make it current.

        Args:
            model: the trainer's network; copied, so the trainer may keep changing it afterwards.
            step: completed training steps behind these weights.
            restored_from: set by a rollback.
            version: the number to publish under, default the next one; a server replica passes the
                number of the trainer's checkpoint it loaded (app.serving.replica).
        """
        snapshot = frozen_copy(model, self.device)  # outside the lock: copying is the slow part
        with self._lock:
            number = self._current.version + 1 if version is None else version
            published = ModelVersion(snapshot, number, step, time.time(), restored_from)
            self._current = published
        self.metrics.model_version.set(published.version)
        logger.info("published model version %d (step %d)", published.version, step)
        return published

    @torch.inference_mode()
    def predict(self, images: Tensor, served: ModelVersion) -> tuple[Tensor, Tensor, Tensor]:
        """Run version `served` on a batch.

        Args:
            images (Tensor[B, 3, S, S]): normalised model input.

        Returns:
            loc (Tensor[B, P, 4]), conf (Tensor[B, P, C]), priors (Tensor[P, 4]), on the host's device.
        """
        return served.model(images.to(self.device))


def initial_model(settings: Settings, store: CheckpointStore | None) -> tuple[SSD, LoadedCheckpoint | None]:
    """The model to start from: the newest good checkpoint, else `SSD_WEIGHTS`, else a fresh init.

    Returns:
        (model on CPU, the checkpoint it came from or None).
    """
    model = build_model(settings.model, settings.num_classes, settings.prior_set)
    checkpoint = store.load_latest() if store is not None else None
    if checkpoint is not None:
        check_compatible(checkpoint.meta, settings)
        model.load_state_dict(checkpoint.state_dict)
        logger.info("resuming from checkpoint version %s", checkpoint.meta["version"])
    elif settings.weights is not None:
        model.load_state_dict(load_file(settings.weights))  # safetensors: never unpickled
        logger.info("loaded weights from %s", settings.weights)
    return model, checkpoint


def check_compatible(meta: dict, settings: Settings) -> None:
    """Refuse a checkpoint written for another architecture, class count or prior set (a checkpoint that
    records no prior set predates the setting: its VGG model had VOC priors)."""
    for key in ("model", "num_classes"):
        if key in meta and meta[key] != getattr(settings, key):
            raise RuntimeError(
                f"checkpoint in {settings.checkpoint_dir} has {key}={meta[key]!r}, settings say "
                f"{getattr(settings, key)!r}"
            )
    recorded = recorded_priors(meta, settings.model)
    if recorded != settings.prior_set:
        raise RuntimeError(
            f"checkpoint in {settings.checkpoint_dir} was trained with priors={recorded!r}, settings give "
            f"{settings.prior_set!r} (SSD_PRIORS={settings.priors or 'unset'}, num_classes={settings.num_classes}); "
            f"set SSD_PRIORS={recorded}"
        )
