"""The annotation stream: labelled images arriving one at a time (Label Studio's annotations) gathered into
fine-tune jobs of SSD_STREAM_BATCH_IMAGES images, each queued through `FinetuneWorker.submit` like a
`POST /finetune` job, so screening, the holdout, the publish gate and replay apply to it unchanged.

Pending images are keyed by task: a newer annotation of a task replaces the pending one, a deleted one
leaves. A job the queue cannot take now (full) stays pending and is offered again by `flush`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from app.core.errors import JobQueueFull, ServiceError
from app.core.metrics import Metrics
from app.core.settings import Settings
from app.online.job_view import JobSource, LabelStudioAnnotation
from app.online.jobs import Job
from app.online.worker import FinetuneWorker
from ssd_core.data.datasets import Sample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamedImage:
    """One annotated image: its `origin` in Label Studio, the decoded `sample` and the `image` bytes as
    fetched (the holdout and the validation set key images by their bytes)."""

    origin: LabelStudioAnnotation
    sample: Sample
    image: bytes


class AnnotationStream:
    """Thread-safe; `add`, `remove` and `flush` are called by the webhook intake's thread."""

    def __init__(self, worker: FinetuneWorker, settings: Settings, metrics: Metrics) -> None:
        self.worker = worker
        self.batch_images = settings.stream_batch_images
        self.steps = settings.stream_steps
        self.augment = None if settings.stream_augment == "none" else settings.stream_augment
        self.metrics = metrics
        self._pending: dict[int, StreamedImage] = {}  # task id -> its latest annotation, in arrival order
        self._drain = False  # START_TRAINING: also submit a last, smaller job
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def add(self, item: StreamedImage) -> list[Job]:
        """Add (or replace) the task's pending image; queue every full batch. Returns the jobs queued."""
        with self._lock:
            self._pending.pop(item.origin.task_id, None)  # a replaced one moves to the end
            self._pending[item.origin.task_id] = item
        return self.flush()

    def add_all(self, items: list[StreamedImage]) -> list[Job]:
        """Add `items` and train on everything pending, a last batch smaller than SSD_STREAM_BATCH_IMAGES
        included (Label Studio's "Start Training")."""
        with self._lock:
            for item in items:
                self._pending.pop(item.origin.task_id, None)
                self._pending[item.origin.task_id] = item
            self._drain = True
        return self.flush()

    def remove(self, annotation_id: int) -> bool:
        """Drop the pending image that came from `annotation_id` (deleted or cancelled in Label Studio)."""
        with self._lock:
            task_ids = [task for task, item in self._pending.items() if item.origin.annotation_id == annotation_id]
            for task_id in task_ids:
                del self._pending[task_id]
            self.metrics.label_studio_pending_images.set(len(self._pending))
            return bool(task_ids)

    def flush(self) -> list[Job]:
        """Queue a job per full batch of pending images (after `add_all`, the rest too) while the queue takes
        them; what it does not take stays pending for the next call."""
        jobs: list[Job] = []
        try:
            while (batch := self._next_batch()) is not None:
                try:
                    job = self.worker.submit(
                        [item.sample for item in batch], [item.image for item in batch], self.steps, None, self.augment,
                        source=JobSource.label_studio, label_studio=[item.origin for item in batch])
                except JobQueueFull:
                    return jobs  # stays pending: offered again by the next flush
                except ServiceError as error:  # refused whatever the queue (shutting down): never retried
                    logger.error("annotation stream: job of %d images refused: %s", len(batch), error.message)
                    job = None
                with self._lock:
                    for item in batch:
                        if self._pending.get(item.origin.task_id) is item:  # not replaced meanwhile
                            del self._pending[item.origin.task_id]
                if job is not None:
                    self.metrics.label_studio_stream_jobs.inc()
                    jobs.append(job)
            return jobs
        finally:
            self.metrics.label_studio_pending_images.set(self.pending)

    def _next_batch(self) -> list[StreamedImage] | None:
        """The oldest SSD_STREAM_BATCH_IMAGES pending images, None while fewer wait (after `add_all`: fewer
        down to the 2 images a job needs)."""
        with self._lock:
            minimum = min(self.batch_images, 2) if self._drain else self.batch_images
            if len(self._pending) < minimum:
                self._drain = False
                return None
            return list(self._pending.values())[: self.batch_images]
