"""Online fine-tuning: a bounded job queue worked by ONE trainer thread.

The trainer owns its own copy of the weights (`ssd_core.training.Trainer`) and publishes a new
model version after every completed optimizer step (with `SSD_EMA_DECAY` > 0 the version is the
exponential moving average of the trainer's weights, `Trainer.published`; the optimizer trains the
raw ones and checkpoints hold both), so `/detect` sees progress within a job and a
cancelled job leaves the model at its last completed step. A skipped (non-finite) step publishes
nothing. With replay (`SSD_REPLAY_RATIO` or a job's `replay`) every step trains on the job's images
plus replayed ones drawn class-balanced from the replay memory (`ssd_core.replay`, in the checkpoint
directory), which a job's images join only when it ends `succeeded`. A checkpoint is written after every job that changed the weights, on demand
(`POST /model/checkpoint`), after a rollback and on shutdown; a job's `checkpoint` says whether the
version it left was written. Every job state change is appended to the job journal
(`app.journal`, beside the checkpoints; fsync'd at acceptance and at each final state), so after a
restart, even after `kill -9`, `GET /finetune/{id}` still answers: a job the previous process did
not finish reads `failed` ("interrupted"), with the restored version.

Locks: `_jobs_lock` (a Condition) guards the queue and job states; `_train_lock` guards the
trainer's weights and optimizer and the checkpoint store. Outside `_train_lock` the trainer's
published weights (`Trainer.published`) always equal the published version's, which is what makes a checkpoint of "the current
version" well defined.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from torch import nn

from app.errors import ApiError
from app.journal import JobJournal
from app.metrics import Metrics, record_match_stats
from app.model_host import ModelHost, ModelVersion
from app.schemas import REPLAY_KEYS_SHOWN, JobCheckpoint, JobReplay, JobState, JobView, StepLoss
from app.settings import Settings
from ssd_core.augment import ssd_augmentation
from ssd_core.checkpoint import CheckpointError, CheckpointInfo, CheckpointStore, LoadedCheckpoint
from ssd_core.datasets import Sample, collate
from ssd_core.ema import EMAConfig
from ssd_core.loss import MultiBoxLoss
from ssd_core.models import SSD
from ssd_core.replay import NO_OBJECT, ReplayMemory
from ssd_core.training import StepResult, TrainConfig, Trainer

logger = logging.getLogger(__name__)

INTERRUPTED = "interrupted: the server stopped before the job finished"


def _finite_or_none(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


@dataclass(eq=False)
class Job:
    """One fine-tune request. `samples` is dropped once the job has finished."""

    samples: list[Sample] | None
    steps_total: int
    learning_rate: float | None
    augment: bool
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: JobState = JobState.queued
    steps_done: int = 0
    skipped_steps: int = 0
    losses: list[StepLoss] = field(default_factory=list)
    model_version: int | None = None
    error: str | None = None
    cancel_requested: bool = False
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    num_images: int = 0
    checkpoint: JobCheckpoint | None = None
    replay_ratio: float = 0.0
    replay: JobReplay | None = None  # set when the job replays anything
    finished: Future = field(default_factory=Future)  # result set when the job reaches a final state

    @classmethod
    def from_view(cls, view: JobView) -> Job:
        """A finished job restored from the journal (no images)."""
        job = cls(None, view.steps_total, view.learning_rate, view.augment, job_id=view.job_id, state=view.status,
                  steps_done=view.steps_done, skipped_steps=view.skipped_steps, losses=view.losses,
                  model_version=view.model_version, error=view.error, cancel_requested=view.cancel_requested,
                  created_at=view.created_at, started_at=view.started_at, finished_at=view.finished_at,
                  num_images=view.num_images, checkpoint=view.checkpoint,
                  replay_ratio=view.replay.ratio if view.replay else 0.0, replay=view.replay)
        job.finished.set_result(None)
        return job

    def view(self) -> JobView:
        return JobView(
            job_id=self.job_id, status=self.state, steps_done=self.steps_done, steps_total=self.steps_total,
            skipped_steps=self.skipped_steps, num_images=self.num_images, learning_rate=self.learning_rate,
            augment=self.augment, losses=list(self.losses), model_version=self.model_version, error=self.error,
            cancel_requested=self.cancel_requested, created_at=self.created_at, started_at=self.started_at,
            finished_at=self.finished_at, checkpoint=self.checkpoint,
            replay=self.replay.model_copy(deep=True) if self.replay else None,
        )


class FinetuneWorker:
    """The fine-tune queue and its trainer thread.

    Args:
        host: where new versions are published.
        trainer: owns the training copy of the weights (equal to `host.current` on entry).
        store: checkpoint store, or None to run without checkpoints.
        saved_version: the version already on disk (the checkpoint the process started from).
        replay: the replay memory (only the trainer thread uses it), or None: no replay.
    """

    def __init__(
        self, host: ModelHost, trainer: Trainer, store: CheckpointStore | None, settings: Settings,
        metrics: Metrics, saved_version: int | None, replay: ReplayMemory | None = None,
    ) -> None:
        self.host = host
        self.trainer = trainer
        self.store = store
        self.replay = replay
        self.settings = settings
        self.metrics = metrics
        self._saved_version = saved_version
        self._journal = None if store is None else JobJournal(store.directory, settings.job_history)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._stopping = False
        self._jobs_lock = threading.Condition()
        self._train_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="finetune-trainer", daemon=True)
        # BatchNorm cannot train on one image (a 1x1 feature map gives one value per channel)
        batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trainer.model.modules())
        self.min_images = 2 if batch_norm else 1

    # ---- lifecycle

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def begin_stop(self) -> None:
        """Refuse new jobs, cancel queued ones and ask the running one to stop after its current step.

        Returns at once; `python -m app` calls it when shutdown begins, so requests waiting on a job
        (`?wait=true`) get their answer before the server stops waiting for open connections.
        """
        with self._jobs_lock:
            self._stopping = True
            while self._queue:
                self._finish(self._queue.popleft(), JobState.cancelled, "server shutting down")
            if self._running is not None:
                self._running.cancel_requested = True
            self._jobs_lock.notify_all()

    def stop(self, timeout: float) -> None:
        """`begin_stop`, let the running step finish, then checkpoint the current version."""
        self.begin_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("trainer still busy after %.0f s; exiting without a final checkpoint", timeout)
            return
        self.save_if_unsaved()
        with self._jobs_lock:
            self._compact_journal()

    # ---- the job journal: job states survive a restart, even kill -9

    def _journal_record(self, job: Job, durable: bool) -> None:
        """Append `job`'s current view (caller holds `_jobs_lock`, which keeps records in order)."""
        if self._journal is not None:
            self._journal.append(job.view(), durable)

    def _compact_journal(self) -> None:
        """One record per known job (caller holds `_jobs_lock`)."""
        if self._journal is not None:
            self._journal.compact([job.view() for job in self._jobs.values()])

    def load_journal(self) -> None:
        """Restore the newest SSD_JOB_HISTORY jobs of previous runs and compact the journal. A job
        whose last record is queued or running was interrupted: it reads `failed`, with the version
        this process restored (its unsaved steps are gone)."""
        if self._journal is None:
            return
        restored = self.host.current.version
        with self._jobs_lock:
            for view in self._journal.replay()[-self.settings.job_history :]:
                if not view.status.finished:
                    view = view.model_copy(update={
                        "status": JobState.failed, "error": INTERRUPTED, "model_version": restored,
                        "finished_at": time.time(),  # when it was found interrupted
                    })
                self._jobs[view.job_id] = Job.from_view(view)
            self._compact_journal()

    # ---- jobs

    def submit(
        self, samples: list[Sample], steps: int, learning_rate: float | None, augment: bool,
        replay: float | None = None,
    ) -> Job:
        """Queue a job; 429 when the queue is full, 422 for too many steps. `replay`: replayed images per
        new image (None: SSD_REPLAY_RATIO)."""
        if steps > self.settings.finetune_max_steps:
            raise ApiError(422, "invalid_value", f"steps: {steps} exceeds the limit of "
                           f"{self.settings.finetune_max_steps}", "steps")
        if len(samples) < self.min_images:
            raise ApiError(422, "invalid_value", f"images: {self.settings.model} has BatchNorm layers and needs at "
                           f"least {self.min_images} images per fine-tune job", "images")
        ratio = self.settings.replay_ratio if replay is None else replay
        job = Job(samples, steps, learning_rate, augment, num_images=len(samples), replay_ratio=ratio)
        with self._jobs_lock:
            if self._stopping:
                raise ApiError(503, "shutting_down", "the server is shutting down")
            if len(self._queue) >= self.settings.finetune_queue_size:
                raise ApiError(429, "queue_full", f"the fine-tune queue holds {len(self._queue)} jobs "
                               f"(limit {self.settings.finetune_queue_size}); retry later", None,
                               headers={"Retry-After": "5"})
            self._jobs[job.job_id] = job
            self._queue.append(job)
            self._journal_record(job, durable=True)  # on disk before the 202
            self.metrics.finetune_queue_depth.set(len(self._queue))
            self._jobs_lock.notify_all()
        return job

    def get(self, job_id: str) -> Job:
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no fine-tune job {job_id!r}", "job_id")
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or a running one after its current step; 409 if already finished."""
        with self._jobs_lock:
            job = self.get(job_id)
            if job.state.finished:
                raise ApiError(409, "job_finished", f"job {job_id} already {job.state.value}", "job_id")
            if job.state == JobState.queued:
                self._queue.remove(job)
                self.metrics.finetune_queue_depth.set(len(self._queue))
                self._finish(job, JobState.cancelled, "cancelled before it started")
            else:
                job.cancel_requested = True
        return job

    def _finish(self, job: Job, state: JobState, error: str | None = None) -> None:
        """Move `job` to a final state (caller holds `_jobs_lock`) and forget the oldest finished jobs."""
        job.state, job.error, job.finished_at, job.samples = state, error, time.time(), None
        self._journal_record(job, durable=True)  # on disk before anyone hears of the final state
        self.metrics.finetune_jobs.labels(state=state.value).inc()
        job.finished.set_result(None)
        finished = [j for j in self._jobs.values() if j.state.finished]
        for old in finished[: max(0, len(finished) - self.settings.job_history)]:
            del self._jobs[old.job_id]
        if self._journal is not None and self._journal.needs_compaction():
            self._compact_journal()

    # ---- the trainer thread

    def _run(self) -> None:
        while True:
            with self._jobs_lock:
                while not self._queue and not self._stopping:
                    self._jobs_lock.wait()
                if self._stopping:
                    return
                job = self._running = self._queue.popleft()
                job.state, job.started_at = JobState.running, time.time()
                self._journal_record(job, durable=False)
                self.metrics.finetune_queue_depth.set(len(self._queue))
            state, error = self._train(job)
            if state == JobState.succeeded:
                self._remember(job)
            job.checkpoint = self._save_for_job()
            with self._jobs_lock:
                self._running = None
                self._finish(job, state, error)

    def _train(self, job: Job) -> tuple[JobState, str | None]:
        """Run the job's steps; returns its final state and error message."""
        assert job.samples is not None
        spec = self.host.spec
        augment = ssd_augmentation(fill=spec.pixel_mean) if job.augment else None
        per_step = self._replay_per_step(job)
        try:
            fixed = None if augment or per_step else collate(job.samples, spec)  # the same batch every step
            for step in range(1, job.steps_total + 1):
                if job.cancel_requested:
                    return JobState.cancelled, "server shutting down" if self._stopping else "cancelled"
                replayed = self._draw_replay(job, per_step)
                images, targets = fixed or collate(job.samples + replayed, spec, augment)  # [B, 3, S, S], list[[n, 6]]
                with self._train_lock:
                    result = self.trainer.step(images, targets, lr=job.learning_rate)
                    served = self.host.current if result.skipped else self.host.publish(
                        self.trainer.published, self.trainer.steps)
                self._record(job, step, result, served, len(replayed))
        except Exception as error:  # a failing job must not take the trainer thread down
            logger.exception("fine-tune job %s failed", job.job_id)
            return JobState.failed, f"{type(error).__name__}: {error}"
        if job.skipped_steps == job.steps_total:
            return JobState.failed, "every step was skipped: non-finite loss or gradients"
        return JobState.succeeded, None

    # ---- the replay memory (trainer thread only)

    def _replay_per_step(self, job: Job) -> int:
        """Replayed images per step of `job` (0 without a memory, with an empty one or ratio 0)."""
        if self.replay is None or not len(self.replay) or job.replay_ratio == 0:
            return 0
        job.replay = JobReplay(ratio=job.replay_ratio, memory_images=len(self.replay), images=0, per_class={},
                               keys=[])
        return max(1, round(job.replay_ratio * job.num_images))

    def _draw_replay(self, job: Job, count: int) -> list[Sample]:
        """Draw `count` images class-balanced and note them in the job's view."""
        if count == 0:
            return []
        assert self.replay is not None and job.replay is not None
        draw = self.replay.draw(count)
        view = job.replay
        view.images += len(draw.samples)
        for sample in draw.samples:
            for name in self._class_names(sample.labels.tolist()):
                view.per_class[name] = view.per_class.get(name, 0) + 1
        shown = set(view.keys)
        view.keys.extend(k for k in dict.fromkeys(draw.keys) if k not in shown)
        del view.keys[REPLAY_KEYS_SHOWN:]
        self.metrics.replayed_images_per_step.observe(len(draw.samples))
        return draw.samples

    def _class_names(self, labels: list[int]) -> list[str]:
        return sorted({self.settings.class_name(label) for label in labels}) or ["no_object"]

    def _remember(self, job: Job) -> None:
        """Offer a succeeded job's training images to the replay memory; a failed write is logged, never raised."""
        if self.replay is None:
            return
        assert job.samples is not None
        try:
            self.replay.add(job.samples, {"job_id": job.job_id})
        except Exception:
            logger.exception("storing job %s's images in the replay memory failed", job.job_id)
        self.update_replay_metrics()

    def update_replay_metrics(self) -> None:
        """Set the replay-memory gauges (images in total and per class) from the memory."""
        if self.replay is None:
            return
        self.metrics.replay_images.set(len(self.replay))
        counts = self.replay.class_counts()
        names = ["no_object", *(self.settings.class_name(label) for label in range(self.settings.num_classes - 1))]
        for label, name in zip([NO_OBJECT, *range(self.settings.num_classes - 1)], names, strict=True):
            self.metrics.replay_class_images.labels(**{"class": name}).set(counts.get(label, 0))

    def _record(self, job: Job, step: int, result: StepResult, served: ModelVersion, replayed: int) -> None:
        metrics = self.metrics
        metrics.learning_rate.set(result.lr)
        metrics.images_processed.labels(route="/finetune").inc(job.num_images + replayed)
        if result.skipped:
            metrics.finetune_skipped_steps.inc()
            job.skipped_steps += 1
        else:
            metrics.finetune_steps.inc()
            record_match_stats(metrics, "finetune", result)
        job.losses.append(StepLoss(
            step=step, loss_l=_finite_or_none(result.loss_l), loss_c=_finite_or_none(result.loss_c),
            skipped=result.skipped, learning_rate=result.lr, model_version=served.version, replayed=replayed,
        ))
        job.steps_done = step
        job.model_version = served.version

    # ---- checkpoints and rollback (callers outside the trainer thread)

    def checkpoint(self) -> tuple[CheckpointInfo, bool]:
        """Save the current version now. Returns (its checkpoint, whether it was written just now)."""
        with self._train_lock:
            return self._checkpoint()

    def rollback(self, version: int) -> ModelVersion:
        """Publish saved `version`'s weights as a NEW version (numbers only grow) and checkpoint it.

        409 while a job is running (it would continue from different weights), 404 for an unknown version.
        """
        store = self._require_store()
        with self._train_lock:
            with self._jobs_lock:
                if self._running is not None:
                    raise ApiError(409, "trainer_busy", f"job {self._running.job_id} is running; "
                                   "cancel it or wait before rolling back", "version")
            try:
                saved = store.load(version)
            except CheckpointError as error:
                raise ApiError(404, "not_found", f"no loadable saved version {version}: {error}", "version") from None
            restore_trainer(self.trainer, saved)
            published = self.host.publish(self.trainer.published, self.trainer.steps, restored_from=version)
            self._checkpoint()
        return published

    def _require_store(self) -> CheckpointStore:
        if self.store is None:
            raise ApiError(409, "no_checkpoint_dir", "no checkpoint directory is configured (SSD_CHECKPOINT_DIR)")
        return self.store

    def _checkpoint(self) -> tuple[CheckpointInfo, bool]:
        """Write the current version unless it is on disk already (caller holds `_train_lock`)."""
        store = self._require_store()
        current = self.host.current
        if current.version == self._saved_version:
            for info in reversed(store.versions()):
                if info.version == current.version:
                    return info, False
        state = self.trainer.state()
        meta = {
            "version": current.version, "step": current.step, "model": self.settings.model,
            "num_classes": self.settings.num_classes, "class_names": self.settings.class_names,
            "restored_from": current.restored_from,
        }
        try:
            info = store.save(state.weights, meta, state.optimizer_state, state.training_weights)
        except Exception:
            self.metrics.checkpoints.labels(outcome="failed").inc()
            raise
        self.metrics.checkpoints.labels(outcome="saved").inc()
        self._saved_version = current.version
        return info, True

    def _save_for_job(self) -> JobCheckpoint | None:
        """Checkpoint the version a job left; whether it is on disk (None without a checkpoint directory)."""
        with self._train_lock:
            if self.store is None:
                return None
            version = self.host.current.version
            error = self._save_unsaved()
            return JobCheckpoint(saved=self._saved_version == version, version=version, error=error)

    def save_if_unsaved(self) -> None:
        """Checkpoint the current version unless it is on disk (at start, at shutdown); a failure
        (full or read-only disk) is logged and counted, never raised. After a job: `_save_for_job`."""
        with self._train_lock:
            self._save_unsaved()

    def _save_unsaved(self) -> str | None:
        """`save_if_unsaved` under `_train_lock`; returns the error message of a failed write."""
        if self.store is None or self.host.current.version == self._saved_version:
            return None
        try:
            self._checkpoint()
        except Exception as error:
            logger.exception("checkpoint of version %d failed", self.host.current.version)
            return f"{type(error).__name__}: {error}"
        return None


def train_config(settings: Settings) -> TrainConfig:
    """The service trainer's optimizer, EMA and step settings (README "The online recipe")."""
    return TrainConfig(
        lr=settings.learning_rate, verify_update=True, ema=EMAConfig(settings.ema_decay, settings.ema_tau)
    )


def restore_trainer(trainer: Trainer, checkpoint: LoadedCheckpoint) -> None:
    """Resume `trainer` from a checkpoint: served (EMA) weights, raw weights, optimizer, step count."""
    trainer.restore(checkpoint.state_dict, checkpoint.optimizer_state, int(checkpoint.meta.get("step", 0)),
                    checkpoint.training_weights)


def start_worker(
    host: ModelHost, model: SSD, store: CheckpointStore | None, checkpoint: LoadedCheckpoint | None,
    settings: Settings, metrics: Metrics,
) -> FinetuneWorker:
    """Give `model` (the weights `host` serves) to a Trainer with the seed's loss, resume its optimizer
    from `checkpoint`, and start the trainer thread."""
    criterion = MultiBoxLoss(settings.num_classes, 0.5, True, 0, True, 3, 0.5, False)
    trainer = Trainer(model, criterion, train_config(settings), host.device)
    saved_version = None
    if checkpoint is not None:
        restore_trainer(trainer, checkpoint)
        saved_version = int(checkpoint.meta["version"])
    replay = None
    if store is not None:
        replay = ReplayMemory(store.directory / "replay", settings.replay_max_images, settings.replay_max_bytes,
                              settings.max_image_pixels)
    worker = FinetuneWorker(host, trainer, store, settings, metrics, saved_version, replay)
    worker.update_replay_metrics()
    worker.save_if_unsaved()  # a fresh start saves its initial weights: a rollback target
    worker.load_journal()
    worker.start()
    return worker
