"""Writing the served version to the checkpoint store, once per version, and pinning saved versions.

Callers (app.online.checkpoints) hold the trainer (`JobTraining.hold`) and pass the trainer state of the
version being served: the trainer's own, or during a gated job the snapshot of the served version.
"""

from __future__ import annotations

import logging

from app.core.errors import Conflict, NotFound, describe
from app.core.metrics import Metrics
from app.core.settings import Settings
from app.online.job_view import JobCheckpoint
from app.serving.model_host import ModelHost
from ssd_core.storage.checkpoint import CheckpointError, CheckpointInfo, CheckpointStore
from ssd_core.storage.checkpoint_meta import checkpoint_meta
from ssd_core.training.trainer import TrainerState

logger = logging.getLogger(__name__)


class VersionSaver:
    """Args: store (None: no checkpoint directory); saved_version: the version already on disk."""

    def __init__(
        self, store: CheckpointStore | None, host: ModelHost, settings: Settings, metrics: Metrics,
        saved_version: int | None,
    ) -> None:
        self.store = store
        self.host = host
        self.settings = settings
        self.metrics = metrics
        self.saved_version = saved_version

    def require_store(self) -> CheckpointStore:
        if self.store is None:
            raise Conflict("no_checkpoint_dir", "no checkpoint directory is configured (SSD_CHECKPOINT_DIR)")
        return self.store

    def save(self, state: TrainerState) -> tuple[CheckpointInfo, bool]:
        """Write the current version unless it is on disk already; (its checkpoint, whether written now)."""
        store = self.require_store()
        current = self.host.current
        if current.version == self.saved_version:
            for info in reversed(store.versions()):
                if info.version == current.version:
                    return info, False
        return self.write(current.version, current.step, current.restored_from, state), True

    def write(self, version: int, step: int, restored_from: int | None, state: TrainerState) -> CheckpointInfo:
        """Write `state` as `version` (counted in `ssd_checkpoints_total`): the current version, or the one a
        rollback is about to publish."""
        store = self.require_store()
        meta = checkpoint_meta(self.host.current.model, self.settings.class_names, version, step,
                               {"restored_from": restored_from})
        try:
            info = store.save(state.weights, meta, state.optimizer_state, state.training_weights)
        except Exception:
            self.metrics.checkpoints.labels(outcome="failed").inc()
            raise
        self.metrics.checkpoints.labels(outcome="saved").inc()
        self.saved_version = version
        return info

    def save_unsaved(self, state: TrainerState) -> str | None:
        """`save` unless the current version is on disk; a failure (full or read-only disk) is logged and
        counted, never raised: returns its message."""
        if self.store is None or self.host.current.version == self.saved_version:
            return None
        try:
            self.save(state)
        except Exception as error:
            logger.exception("checkpoint of version %d failed", self.host.current.version)
            return describe(error)
        return None

    def job_checkpoint(self, state: TrainerState) -> JobCheckpoint | None:
        """Checkpoint the version a job left; whether it is on disk (None without a checkpoint directory)."""
        if self.store is None:
            return None
        version = self.host.current.version
        error = self.save_unsaved(state)
        return JobCheckpoint(saved=self.saved_version == version, version=version, error=error)

    def pin(self, version: int, pinned: bool) -> set[int]:
        """Pin (or unpin) saved `version`; every pinned version. Raises NotFound for a version not saved
        (pinning) or not pinned (unpinning)."""
        store = self.require_store()
        if pinned:
            try:
                store.pin(version)
            except CheckpointError as error:
                raise NotFound("not_found", str(error), "version") from None
        elif not store.unpin(version):
            raise NotFound("not_found", f"version {version} is not pinned", "version")
        return store.pinned()
