"""The fine-tune job journal: an append-only JSON-lines file of job views beside the checkpoints.

One line per state change (queued, running, final), each line a full `JobView`. A record that must
survive `kill -9` (acceptance, final states) is fsync'd before the caller answers; the `running`
record is only flushed (losing it merely reports the job as interrupted while queued). Replaying
keeps the last record per job id; `restore` reads the jobs of previous runs back, a job they left
unfinished as failed ("interrupted"). `compact` rewrites the file atomically with one record per job;
the caller passes at most SSD_JOB_HISTORY finished jobs (plus the unfinished ones), so the file stays
bounded.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from pydantic import ValidationError

from app.online.job_view import JobState, JobView
from ssd_core.storage.atomic import atomic_write

logger = logging.getLogger(__name__)

JOURNAL_NAME = "jobs.jsonl"
INTERRUPTED = "interrupted: the server stopped before the job finished"


class JobJournal:
    """Append-only job records in `directory/jobs.jsonl`.

    Args:
        directory: the checkpoint directory.
        history: SSD_JOB_HISTORY; `needs_compaction` once the file holds more than 4 records per kept job.
    """

    def __init__(self, directory: Path, history: int) -> None:
        self.path = Path(directory) / JOURNAL_NAME
        self.history = history
        self._records = 0  # lines in the file since the last compaction

    def replay(self) -> list[JobView]:
        """The last record of each job, in order of first appearance; unreadable lines are skipped
        (a torn last line after `kill -9`)."""
        views: dict[str, JobView] = {}
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        for number, line in enumerate(lines, 1):
            try:
                view = JobView.model_validate_json(line)
            except ValidationError as error:
                logger.warning("%s line %d: skipping unreadable record (%s)", self.path, number, error.errors()[0]["msg"])
                continue
            views[view.job_id] = view
        self._records = len(lines)
        return list(views.values())

    def restore(self, restored_version: int) -> list[JobView]:
        """The newest `history` jobs of previous runs, oldest first. A job whose last record is queued or
        running was interrupted: it reads `failed`, with `restored_version` (the version this process
        restored: its unsaved steps are gone)."""
        views = self.replay()[-self.history :]
        return [view if view.status.finished else view.model_copy(update={
            "status": JobState.failed, "error": INTERRUPTED, "model_version": restored_version,
            "finished_at": time.time(),  # when it was found interrupted
        }) for view in views]

    def append(self, view: JobView, durable: bool) -> bool:
        """Add one record; `durable` fsyncs it. Returns False (logged) when the disk refuses it."""
        line = view.model_dump_json().encode() + b"\n"
        try:
            with self.path.open("ab") as f:
                f.write(line)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
        except OSError:
            logger.exception("cannot append to the job journal %s", self.path)
            return False
        self._records += 1
        return True

    def needs_compaction(self) -> bool:
        return self._records > 4 * self.history

    def compact(self, views: list[JobView]) -> None:
        """Replace the file by one record per job of `views` (atomically; failures logged)."""
        data = b"".join(view.model_dump_json().encode() + b"\n" for view in views)
        try:
            atomic_write(self.path, data, ".")  # the temp file: .jobs.jsonl.<random>
        except OSError:
            logger.exception("cannot compact the job journal %s", self.path)
            return
        self._records = len(views)
