"""The served model: immutable published versions, swapped atomically.

A `ModelVersion` is never mutated after publication: training works on its own copy of the
weights and publishes a fresh frozen copy, so a request that picked up version v computes with
version v's weights from start to finish. Publishing replaces one reference under a lock; readers
take the reference without locking (an attribute read is atomic). Version numbers come from
`ssd_core.storage.version_numbers`: each is on disk before it is published, so no number is ever
reused, even after `kill -9`.
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
from app.serving.backends import DTYPES, BackgroundRunner, OnnxGraph, Runner, TorchRunner, serving_backend
from ssd_core.models import SSD, build_model
from ssd_core.models.devices import resolve_device
from ssd_core.storage.checkpoint import CheckpointStore, LoadedCheckpoint
from ssd_core.storage.checkpoint_meta import recorded_priors
from ssd_core.storage.version_numbers import VersionNumbers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVersion:
    """One published version: an eval-mode model that nothing writes to any more.

    Attributes:
        model: the network (eval mode, no gradients) on the host's device.
        version: its number; strictly increasing over the life of a checkpoint directory, never reused.
        step: completed training steps behind these weights.
        published_at: UNIX time of publication.
        restored_from: the saved version a rollback copied, else None.
        runner: what serves its forward passes (`app.serving.backends`), set by the host.
    """

    model: SSD
    version: int
    step: int
    published_at: float
    restored_from: int | None = None
    runner: Runner | None = None

    @property
    def backend(self) -> str:
        """What serves its forward passes now: `onnxruntime`, or `torch` (also while its session is built)."""
        return self.runner.backend if self.runner is not None else "torch"


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
        numbers: where new version numbers come from (default: in memory, from `version`).

    Attributes:
        backend: what serves the versions, `SSD_BACKEND` on this device (`serving_backend`): torch or onnxruntime.
        exclusive: held by whatever trains or traces a model in this process: the trainer's steps, gate and
            state changes (app.online.job_training) and export (app.serving.export). torch's FX tracing
            state is process-global, so an export traced beside a backward pass corrupts both.
    """

    def __init__(
        self, settings: Settings, metrics: Metrics, model: SSD, version: int, step: int,
        numbers: VersionNumbers | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.device = resolve_device(settings.device, "SSD_DEVICE")
        self.spec = model.spec
        self.priors: Tensor = model.priors.to(self.device)  # [P, 4] cxcywh, the same for every version
        self.numbers = numbers if numbers is not None else VersionNumbers(None, version)
        self.exclusive = threading.Lock()
        self._lock = threading.Lock()
        self._building: list[BackgroundRunner] = []  # sessions published versions may still be building
        self.dtype = DTYPES[settings.inference_dtype]
        if self.dtype != torch.float32 and self.device.type != "cuda":
            raise ValueError(f"SSD_INFERENCE_DTYPE={settings.inference_dtype} needs a CUDA device; SSD_DEVICE="
                             f"{settings.device} serves on {self.device}: set SSD_INFERENCE_DTYPE=float32")
        self.backend = serving_backend(settings.backend, self.device, settings.role)
        self.graph = self._onnx_graph(model) if self.backend == "onnxruntime" else None
        frozen = frozen_copy(model, self.device)
        runner = self._runner(frozen)
        if isinstance(runner, BackgroundRunner):
            runner.ready.wait()  # the first version is served by its configured backend from the first request
        self._current = ModelVersion(frozen, version, step, time.time(), runner=runner)
        metrics.model_version.set(version)
        metrics.model.info({
            "architecture": settings.model, "num_classes": str(settings.num_classes), "device": str(self.device),
            "backend": self.backend,
        })

    @property
    def current(self) -> ModelVersion:
        """The version to serve now; keep the returned object for the whole request."""
        return self._current

    def reserve_version(self) -> int:
        """The number the next `publish` will use, on disk before this returns (`VersionNumbers.reserve`);
        raises OSError when it cannot be written: nothing can be published then."""
        with self._lock:
            return self.numbers.reserve()

    def discard_reserved_version(self) -> None:
        """Skip the reserved number (a failed state change may have written it somewhere)."""
        with self._lock:
            self.numbers.discard()

    def publish(
        self, model: SSD, step: int, restored_from: int | None = None, version: int | None = None
    ) -> ModelVersion:
        """Freeze a copy of `model` as the next version and make it current.

        Args:
            model: the trainer's network; copied, so the trainer may keep changing it afterwards.
            step: completed training steps behind these weights.
            restored_from: set by a rollback.
            version: the number to publish under, default the next one (reserved, or reserved now); a
                server replica passes the number of the trainer's checkpoint it loaded (app.serving.replica).

        Raises:
            OSError: the next number cannot be put on disk; nothing is published.
        """
        snapshot = frozen_copy(model, self.device)  # outside the lock: copying is the slow part
        runner = self._runner(snapshot)
        with self._lock:
            number = self.numbers.take() if version is None else version
            published = ModelVersion(snapshot, number, step, time.time(), restored_from, runner)
            self._current = published
        self.metrics.model_version.set(published.version)
        logger.info("published model version %d (step %d)", published.version, step)
        return published

    def finish_builds(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the sessions still being built (`BackgroundRunner.join`); the last
        call of a shutdown, once nothing publishes any more. Returns whether none is left."""
        deadline = time.monotonic() + timeout
        with self._lock:
            building = list(self._building)
        return all([runner.join(max(0.0, deadline - time.monotonic())) for runner in building])

    def predict(self, images: Tensor, served: ModelVersion) -> tuple[Tensor, Tensor, Tensor]:
        """Run version `served` on a batch, with its backend's runner.

        Args:
            images (Tensor[B, 3, S, S]): normalised model input (on the CPU, or the host's device).

        Returns:
            loc (Tensor[B, P, 4]), conf (Tensor[B, P, C]), priors (Tensor[P, 4]), float32 on the host's device.
        """
        runner = served.runner or TorchRunner(served.model, self.device)
        loc, conf = runner(images)
        return loc, conf, self.priors

    def _onnx_graph(self, model: SSD) -> OnnxGraph | None:
        """The ONNX graph every version's session is built from; None (logged: torch serves every version, each
        counted by `_runner`) when the export fails. Exporting traces, so it holds `exclusive`."""
        try:
            with self.exclusive:
                return OnnxGraph(model, self.device, self.settings.torch_threads)
        except Exception:
            logger.exception("cannot export the ONNX graph of %s: serving with torch", self.settings.model)
            return None

    def _runner(self, model: SSD) -> Runner:
        """The configured backend's runner of `model`'s weights. ONNX Runtime's session is built in the background
        (torch serves until it is ready; a publish never waits for it); torch keeps serving a version whose
        session cannot be built (logged, counted), so that a version is never left unserved."""
        torch_runner = TorchRunner(model, self.device, self.dtype)
        if self.graph is not None:
            graph = self.graph
            runner = BackgroundRunner(torch_runner, lambda: graph.runner(model), self.metrics.backend_fallbacks.inc)
            with self._lock:
                self._building = [built for built in self._building if not built.ready.is_set()] + [runner]
            return runner
        if self.backend == "onnxruntime":
            self.metrics.backend_fallbacks.inc()  # no graph: every version is served by torch
        return torch_runner


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


def start_host(
    settings: Settings, metrics: Metrics, model: SSD, checkpoint: LoadedCheckpoint | None, store: CheckpointStore | None,
) -> ModelHost:
    """The host serving `model` (from `initial_model`) as the checkpoint's version, else as version 0.

    A trainer's numbers come from the store's version mark: numbers handed out before a crash that no
    loadable checkpoint holds are recorded as lost and never handed out again; a start with no loadable
    checkpoint in a directory that has used numbers serves its weights under a new one. A server replica
    publishes only the trainer's numbers.
    """
    version = int(checkpoint.meta["version"]) if checkpoint is not None else 0
    step = int(checkpoint.meta.get("step", 0)) if checkpoint is not None else 0
    numbers = VersionNumbers(None if store is None or store.read_only else store, version)
    if checkpoint is None and numbers.issued > version:
        version = numbers.take()
    return ModelHost(settings, metrics, model, version, step, numbers)


def check_compatible(meta: dict, settings: Settings) -> None:
    """Refuse a checkpoint written for another architecture, class count or prior set (a checkpoint that
    records no prior set predates the setting: its VGG model had VOC priors)."""
    elsewhere = "or set SSD_CHECKPOINT_DIR to another directory to start afresh"
    for key in ("model", "num_classes"):
        if key in meta and meta[key] != getattr(settings, key):
            raise RuntimeError(
                f"checkpoint version {meta.get('version')} in {settings.checkpoint_dir} has {key}={meta[key]!r}, "
                f"SSD_{key.upper()}={getattr(settings, key)!r}: set SSD_{key.upper()}={meta[key]} to resume it, "
                f"{elsewhere}"
            )
    recorded = recorded_priors(meta, settings.model)
    if recorded != settings.prior_set:
        raise RuntimeError(
            f"checkpoint in {settings.checkpoint_dir} was trained with priors={recorded!r}, settings give "
            f"{settings.prior_set!r} (SSD_PRIORS={settings.priors or 'unset'}, num_classes={settings.num_classes}); "
            f"set SSD_PRIORS={recorded}, {elsewhere}"
        )
