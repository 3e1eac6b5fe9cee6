"""The checkpoint operations on the trainer's versions: checkpoint the served version (on demand, after a
job, at start and shutdown), roll back to a saved one, pin or unpin saved ones.

Each holds the trainer (`JobTraining.hold`), so no step, snapshot or gate runs meanwhile and the store
sees one writer at a time (a pin never races a prune). What "the current version" writes is the served
version's trainer state (`JobTraining.served_state`), the writing itself is app.online.version_saver.
"""

from __future__ import annotations

from collections.abc import Callable

from app.core.errors import Conflict, NotFound, ServiceError, describe, without_paths
from app.online.job_training import JobTraining
from app.online.job_view import JobCheckpoint
from app.online.jobs import Job
from app.online.version_saver import VersionSaver
from app.serving.model_host import ModelVersion
from ssd_core.storage.checkpoint import CheckpointError, CheckpointInfo


class Checkpoints:
    """Args: saver (writes and pins), training (the trainer), running: the job the trainer thread is on, if any."""

    def __init__(self, saver: VersionSaver, training: JobTraining, running: Callable[[], Job | None]) -> None:
        self._saver = saver
        self._training = training
        self._running = running

    def checkpoint(self) -> tuple[CheckpointInfo, bool]:
        """Save the current version now. Returns (its checkpoint, whether it was written just now)."""
        with self._training.hold():
            return self._saver.save(self._training.served_state())

    def after_job(self) -> JobCheckpoint | None:
        """Checkpoint the version a job left; whether it is on disk (None without a checkpoint directory)."""
        with self._training.hold():
            return self._saver.job_checkpoint(self._training.served_state())

    def save_if_unsaved(self) -> None:
        """Checkpoint the current version unless it is on disk (at start, at shutdown); failures are logged
        and counted, never raised."""
        with self._training.hold():
            self._saver.save_unsaved(self._training.served_state())

    def rollback(self, version: int) -> ModelVersion:
        """Publish saved `version`'s weights as a NEW version (numbers only grow), checkpointed before it is
        published; all or nothing (`JobTraining.restore`).

        Raises Conflict while a job is running (it would continue from different weights) or without a
        checkpoint directory, NotFound for a version that is not saved or cannot be loaded, OSError when the
        new version cannot be written, ServiceError `rollback_failed` (500) for any other failure; after
        any of them the trainer, its optimizer and the served version are exactly as before."""
        store = self._saver.require_store()
        with self._training.hold():
            running = self._running()
            if running is not None:
                raise Conflict("trainer_busy", f"job {running.job_id} is running; "
                               "cancel it or wait before rolling back", "version")
            saved_versions = [info.version for info in store.versions()]
            if version not in saved_versions:
                raise NotFound("not_found", f"version {version} is not saved; the saved versions are "
                               f"{saved_versions or 'none yet'} (GET /model/versions)", "version")
            try:
                saved = store.load(version)
            except CheckpointError as error:
                raise NotFound("not_found", f"saved version {version} cannot be loaded ({without_paths(str(error))}); "
                               f"the saved versions are {saved_versions}", "version") from None
            trainer = self._training.trainer

            def save(number: int) -> None:
                self._saver.write(number, trainer.steps, version, trainer.state())

            try:
                return self._training.restore(saved, version, save)
            except OSError:
                raise
            except Exception as error:
                served = self._saver.host.current.version
                raise ServiceError("rollback_failed", f"rollback to version {version} failed and changed nothing "
                                   f"(version {served} is served): {describe(error)}", "version") from error

    def pin(self, version: int, pinned: bool) -> set[int]:
        """Pin or unpin a saved version; every pinned version. Raises NotFound for a version not saved
        (pinning) or not pinned (unpinning), Conflict without a checkpoint directory."""
        with self._training.hold():
            return self._saver.pin(version, pinned)
