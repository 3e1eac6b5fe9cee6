"""Replicas: server processes that follow the trainer's shared checkpoint directory.

One process runs with SSD_ROLE=trainer: it works the fine-tune queue and writes a checkpoint of the
version every job ends on (and of rollbacks, `POST /model/checkpoint` and the shutdown version; see
app.online.worker). Any number run with SSD_ROLE=server: they never train, and a `CheckpointWatcher` thread
polls the directory every SSD_RELOAD_INTERVAL seconds, loads a newer checkpoint off the request path and
publishes it through the model host under the trainer's version number, so a version number names the
same weights on every replica. A checkpoint exists only once its JSON sidecar, written last and
atomically, is on disk, and `CheckpointStore.load` verifies every file against the sidecar's size and
sha256: a server never loads a half-written checkpoint.
"""

from __future__ import annotations

import logging
import threading

from app.core.metrics import Metrics
from app.core.settings import Settings
from app.serving.model_host import ModelHost, ModelVersion, check_compatible
from ssd_core.models import build_model
from ssd_core.storage.checkpoint import CheckpointInfo, CheckpointStore

logger = logging.getLogger(__name__)

class CheckpointWatcher:
    """Polls a shared checkpoint directory and publishes each newer version through the model host.

    Args:
        host: the server's model host; only the watcher publishes to it.
        store: a read-only `CheckpointStore` on the trainer's directory.
        settings: architecture and class count (a checkpoint of another model is refused), reload interval.
        metrics: `ssd_model_reloads_total{outcome}`.
        synced: whether `host.current` came from `store` (the newest checkpoint, loaded at start). Until it
            has, the newest checkpoint is adopted even at the version number already served, because the
            served weights were a local initialisation, not the trainer's.
    """

    def __init__(
        self, host: ModelHost, store: CheckpointStore, settings: Settings, metrics: Metrics, synced: bool
    ) -> None:
        self.host = host
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.synced = synced
        self._failed: set[int] = set()  # a version's files never change once its sidecar exists
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop polling; a load in progress finishes first (at most `timeout` seconds are waited)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.wait(self.settings.reload_interval):
            self.poll()

    def poll(self) -> ModelVersion | None:
        """Publish the newest loadable checkpoint newer than the served version.

        Returns:
            the published version, or None when there was nothing newer (or it failed: logged and counted
            in `ssd_model_reloads_total{outcome="failed"}`; never raised, the server keeps serving).
        """
        try:
            newer = self._newer_versions()
        except Exception:  # e.g. the shared volume is briefly unreachable: try again next poll
            logger.exception("cannot list the checkpoints in %s", self.store.directory)
            self.metrics.model_reloads.labels(outcome="failed").inc()
            return None
        for info in newer:
            try:
                return self._publish(info)
            except Exception:  # corrupt, pruned meanwhile, or another architecture: fall back to an older one
                logger.exception("cannot load checkpoint version %d from %s", info.version, self.store.directory)
                self.metrics.model_reloads.labels(outcome="failed").inc()
                self._failed.add(info.version)
        return None

    def _newer_versions(self) -> list[CheckpointInfo]:
        """Saved versions the server should move to, newest first."""
        served = self.host.current.version
        return [
            info for info in reversed(self.store.versions())
            if (info.version > served or (info.version == served and not self.synced))
            and info.version not in self._failed
        ]

    def _publish(self, info: CheckpointInfo) -> ModelVersion:
        checkpoint = self.store.load(info.version)  # verifies every file against the sidecar
        check_compatible(checkpoint.meta, self.settings)
        model = build_model(self.settings.model, self.settings.num_classes, self.settings.prior_set)
        model.load_state_dict(checkpoint.state_dict)
        published = self.host.publish(
            model, int(checkpoint.meta.get("step", 0)), checkpoint.meta.get("restored_from"), version=info.version
        )
        self.synced = True
        self.metrics.model_reloads.labels(outcome="loaded").inc()
        return published


def start_watcher(
    host: ModelHost, store: CheckpointStore, settings: Settings, metrics: Metrics, synced: bool
) -> CheckpointWatcher:
    """Start following `store` (see `CheckpointWatcher`); its first poll is one reload interval away."""
    watcher = CheckpointWatcher(host, store, settings, metrics, synced)
    watcher.start()
    return watcher
