"""Online fine-tuning: a bounded job queue worked by ONE trainer thread.

This module is the queue and its thread; how one job trains and is published (screening, holdout,
steps, gate) is app.online.job_training, the checkpoint operations app.online.checkpoints, the job
journal app.online.journal, a job's lifecycle app.online.jobs. The trainer owns its
own copy of the weights (`ssd_core.training.trainer.Trainer`). What is evaluated and published is
`Trainer.published`: with `SSD_EMA_DECAY` > 0 the exponential moving average of the trainer's
weights (`ssd_core.training.ema`), else those weights; the optimizer trains the raw ones and checkpoints hold
both. With replay (`SSD_REPLAY_RATIO` or a job's `replay`) every step trains on the job's images
plus replayed ones drawn class-balanced from the replay memory (app.online.replayer, ssd_core.online.replay).
What reaches clients depends on SSD_PUBLISH (docs/online-learning.md, "Publishing"): `gated` (default) publishes a
job's weights only through the gate, `every_step` after every completed step (unprotected).

A checkpoint is written after every job that published, on demand (`POST /model/checkpoint`), after
a rollback and on shutdown; a job's `checkpoint` says whether the version it left was written. Every
job state change is appended to the job journal (`app.online.journal`, beside the checkpoints; fsync'd at
acceptance and at each final state), so after a restart, even after `kill -9`,
`GET /finetune/{id}` still answers: a job the previous process did not finish reads `failed`
("interrupted"), with the restored version.

Locks: `_jobs_lock` (a Condition) guards the queue and job states; the trainer's (`JobTraining.hold`)
guards its weights and optimizer and the checkpoint store. Where both are held, the trainer's is taken
first.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque

from app.core.errors import InvalidValue, JobQueueFull, NotFound, Unavailable
from app.core.metrics import Metrics
from app.core.settings import Settings
from app.online.checkpoints import Checkpoints
from app.online.job_training import JobTraining, restore_trainer
from app.online.job_view import JobSource, JobState, LabelStudioAnnotation
from app.online.jobs import Job
from app.online.journal import JobJournal
from app.online.replayer import Replayer
from app.online.validation_set import ValidationSet
from app.online.version_saver import VersionSaver
from app.serving.model_host import ModelHost, ModelVersion
from ssd_core.data.datasets import Sample
from ssd_core.loss.multibox import MultiBoxLoss
from ssd_core.models import SSD
from ssd_core.online.replay import ReplayMemory
from ssd_core.storage.checkpoint import CheckpointInfo, CheckpointStore, LoadedCheckpoint
from ssd_core.training.ema import EMAConfig
from ssd_core.training.trainer import TrainConfig, Trainer

logger = logging.getLogger(__name__)


class FinetuneWorker:
    """The fine-tune queue and its trainer thread.

    Args:
        host: where new versions are published.
        trainer: owns the training copy of the weights (equal to `host.current` on entry).
        store: checkpoint store, or None to run without checkpoints.
        validation: the validation set (held-out images of accepted jobs join it).
        saved_version: the version already on disk (the checkpoint the process started from).
        replay: the replay memory (only the trainer thread uses it), or None: no replay.
    """

    def __init__(
        self, host: ModelHost, trainer: Trainer, store: CheckpointStore | None, validation: ValidationSet,
        settings: Settings, metrics: Metrics, saved_version: int | None, replay: ReplayMemory | None = None,
    ) -> None:
        self.host = host
        self.trainer = trainer
        self.validation = validation
        self.settings = settings
        self.metrics = metrics
        self.training = JobTraining(host, trainer, validation, Replayer(replay, settings, metrics), settings, metrics,
                                    stopping=lambda: self._stopping)
        self.checkpoints = Checkpoints(VersionSaver(store, host, settings, metrics, saved_version), self.training,
                                       running=self._running_job)
        self._journal = None if store is None else JobJournal(store.directory, settings.job_history)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._stopping = False
        self._jobs_lock = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="finetune-trainer", daemon=True)

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
                self._running.request_cancel()
            self._jobs_lock.notify_all()

    def stop(self, timeout: float) -> None:
        """`begin_stop`, let the running step finish, then checkpoint the current version."""
        self.begin_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("trainer still busy after %.0f s; exiting without a final checkpoint", timeout)
            return
        self.checkpoints.save_if_unsaved()
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
        """Restore the newest SSD_JOB_HISTORY jobs of previous runs (`JobJournal.restore`) and compact the
        journal."""
        if self._journal is None:
            return
        restored = self.host.current.version
        with self._jobs_lock:
            views = self._journal.restore(restored)
            for view in views:
                self._jobs[view.job_id] = Job.from_view(view)
            self._compact_journal()

    # ---- jobs

    def submit(
        self, samples: list[Sample], images: list[bytes], steps: int, learning_rate: float | None, augment: str | None,
        force: bool = False, replay: float | None = None, source: JobSource = JobSource.api,
        label_studio: list[LabelStudioAnnotation] | None = None,
    ) -> Job:
        """Queue a job on `samples` (decoded from `images`, the bytes as sent). `augment`: a name in
        `ssd_core.data.augment.AUGMENTATIONS` or None. `replay`: replayed images
        per new image (None: SSD_REPLAY_RATIO); `source` and `label_studio`: who asked (the annotation stream
        names each image's Label Studio annotation). Raises InvalidValue for too many steps, too high a learning
        rate or too few images, JobQueueFull when the queue is full, Unavailable while shutting down."""
        if steps > self.settings.finetune_max_steps:
            raise InvalidValue("steps", f"{steps} exceeds the limit of {self.settings.finetune_max_steps} "
                               "(SSD_FINETUNE_MAX_STEPS)")
        limit = self.settings.learning_rate_limit()
        if learning_rate is not None and learning_rate > limit:
            raise InvalidValue("learning_rate", f"{learning_rate} exceeds the limit of {limit:g} "
                               "(SSD_MAX_LEARNING_RATE, unset: 10 x SSD_LEARNING_RATE)")
        self.training.require_images(len(samples))
        ratio = self.settings.replay_ratio if replay is None else replay
        job = Job(samples, steps, learning_rate, augment, images=images, force=force, num_images=len(samples),
                  replay_ratio=ratio, source=source, label_studio=label_studio)
        with self._jobs_lock:
            if self._stopping:
                raise Unavailable("shutting_down", "the server is shutting down")
            if len(self._queue) >= self.settings.finetune_queue_size:
                raise JobQueueFull("queue_full", f"the fine-tune queue holds {len(self._queue)} jobs "
                                f"(limit {self.settings.finetune_queue_size}); retry later", retry_after_s=5)
            self._jobs[job.job_id] = job
            self._queue.append(job)
            self._journal_record(job, durable=True)  # on disk before the 202
            self.metrics.finetune_queue_depth.set(len(self._queue))
            self._jobs_lock.notify_all()
        return job

    def get(self, job_id: str) -> Job:
        """Raises NotFound for a job this process does not know (never submitted, or forgotten)."""
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound("not_found", f"no fine-tune job {job_id!r}", "job_id")
        return job

    def jobs(self, status: JobState | None = None, source: JobSource | None = None) -> list[Job]:
        """The jobs this process knows (queued, running and the last SSD_JOB_HISTORY finished), newest first,
        those of `status` and `source` only when given."""
        with self._jobs_lock:
            known = list(self._jobs.values())  # in submission order (restored ones first)
        return [job for job in reversed(known)
                if (status is None or job.state == status) and (source is None or job.source == source)]

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or a running one after its current step. Raises NotFound for an unknown
        job, Conflict for a finished one."""
        with self._jobs_lock:
            job = self.get(job_id)
            if job.state == JobState.queued:
                self._queue.remove(job)
                self.metrics.finetune_queue_depth.set(len(self._queue))
                self._finish(job, JobState.cancelled, "cancelled before it started")
            else:
                job.request_cancel()
        return job

    def _running_job(self) -> Job | None:
        with self._jobs_lock:
            return self._running

    def _finish(self, job: Job, state: JobState, error: str | None = None) -> None:
        """Move `job` to a final state (caller holds `_jobs_lock`) and forget the oldest finished jobs."""
        job.finish(state, error)
        self._journal_record(job, durable=True)  # on disk before anyone hears of the final state
        self.metrics.finetune_jobs.labels(state=state.value).inc()
        logger.info("fine-tune job %s %s", job.job_id, job_summary(job))  # logged before a waiting client hears
        job.notify_finished()
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
                job.start()
                self._journal_record(job, durable=False)
                self.metrics.finetune_queue_depth.set(len(self._queue))
            logger.info("fine-tune job %s started: %d images, %d steps, learning rate %s", job.job_id, job.num_images,
                        job.steps_total, job.learning_rate or f"{self.settings.learning_rate:g} (SSD_LEARNING_RATE)")
            state, error = self.training.run(job)
            job.set_checkpoint(self.checkpoints.after_job())
            with self._jobs_lock:
                self._running = None
                self._finish(job, state, error)

    # ---- the checkpoint operations the routes call (app.online.checkpoints)

    def checkpoint(self) -> tuple[CheckpointInfo, bool]:
        return self.checkpoints.checkpoint()

    def rollback(self, version: int) -> ModelVersion:
        return self.checkpoints.rollback(version)

    def pin(self, version: int, pinned: bool) -> set[int]:
        return self.checkpoints.pin(version, pinned)


def job_summary(job: Job) -> str:
    """A finished job in one line: its state, steps, last loss, the gate's decision and the version it left."""
    last = next((step for step in reversed(job.losses) if step.loss_l is not None), None)
    loss = f"{last.loss_l + last.loss_c:.3f}" if last is not None and last.loss_c is not None else "none"
    decision = job.evaluation.decision if job.evaluation is not None else "not judged"
    ending = f": {job.error}" if job.error else ""
    return (f"{job.state.value}{ending}; {job.steps_done}/{job.steps_total} steps ({job.skipped_steps} skipped), "
            f"last loss {loss}, gate {decision}, model version {job.model_version}")


def train_config(settings: Settings) -> TrainConfig:
    """The service trainer's optimizer, warm-up, clipping and EMA (docs/online-learning.md, "The online recipe").
    The warm-up applies to trained weights (SSD_WEIGHTS, the demo model) as to random ones: it protects the
    weights from a fresh optimizer's first steps, and AdamW's first steps move every weight by about the
    learning rate whatever its gradient (on the demo model, 8 clean jobs without it raised the validation
    loss by 40%; with it the loss fell 13%)."""
    return TrainConfig(
        lr=settings.learning_rate, optimizer=settings.optimizer, warmup_steps=settings.warmup_steps,
        clip_grad_norm=settings.clip_grad_norm,
        verify_update=True, ema=EMAConfig(settings.ema_decay, settings.ema_tau),
    )


def start_worker(
    host: ModelHost, model: SSD, store: CheckpointStore | None, checkpoint: LoadedCheckpoint | None,
    settings: Settings, metrics: Metrics,
) -> FinetuneWorker:
    """Give `model` (the weights `host` serves) to a Trainer with ssd.pytorch's loss, resume its optimizer
    from `checkpoint`, and start the trainer thread."""
    criterion = MultiBoxLoss.ssd_pytorch(settings.num_classes)
    trainer = Trainer(model, criterion, train_config(settings), host.device)
    saved_version = None
    if checkpoint is not None:
        restore_trainer(trainer, checkpoint)
        saved_version = int(checkpoint.meta["version"])
    validation = ValidationSet(settings, store.directory if store is not None else None)
    replay = None
    if store is not None:
        replay = ReplayMemory(store.directory / "replay", settings.replay_max_images, settings.replay_max_bytes,
                              settings.max_image_pixels)
    worker = FinetuneWorker(host, trainer, store, validation, settings, metrics, saved_version, replay)
    worker.checkpoints.save_if_unsaved()  # a fresh start saves its initial weights: a rollback target
    worker.load_journal()
    worker.start()
    return worker
