"""Online fine-tuning: a bounded job queue worked by ONE trainer thread.

The trainer owns its own copy of the weights (`ssd_core.training.Trainer`). What is evaluated and
published is `Trainer.published`: with `SSD_EMA_DECAY` > 0 the exponential moving average of the
trainer's weights (`ssd_core.ema`), else those weights; the optimizer trains the raw ones and
checkpoints hold both. With replay (`SSD_REPLAY_RATIO` or a job's `replay`) every step trains on the
job's images plus replayed ones drawn class-balanced from the replay memory (`ssd_core.replay`, in
the checkpoint directory), which a job's training images (never its held-out ones) join only when
the job ends `succeeded`. What reaches clients depends on SSD_PUBLISH (README, "Publishing"):
  * `gated` (default): before its first step a job's batch is screened with the served model
    (app.publishing, rule in ssd_core.screening); the job trains on the images outside the holdout
    (ssd_core.holdout) without publishing anything; at its end (and every SSD_PUBLISH_EVERY_STEPS
    steps) the publish gate (ssd_core.gate) compares the trained weights with the served version on
    the validation set (app.validation) and publishes them, or rejects the job and restores the
    trainer's weights, BatchNorm buffers and optimizer state to the served version's, bitwise.
    During a job `/detect` keeps answering with the served version; a cancelled or failed job
    publishes nothing. Only an accepted job's held-out images join the validation set.
  * `every_step`: a new version after every completed optimizer step (unprotected), so `/detect`
    sees progress within a job and a cancelled job leaves the model at its last completed step.
A skipped (non-finite) step publishes nothing. A checkpoint is written after every job that
published, on demand (`POST /model/checkpoint`), after a rollback and on shutdown; a job's
`checkpoint` says whether the version it left was written. Every job state change is appended to
the job journal (`app.journal`, beside the checkpoints; fsync'd at acceptance and at each final
state), so after a restart, even after `kill -9`, `GET /finetune/{id}` still answers: a job the
previous process did not finish reads `failed` ("interrupted"), with the restored version.

Locks: `_jobs_lock` (a Condition) guards the queue and job states; `_train_lock` guards the
trainer's weights and optimizer and the checkpoint store. What a checkpoint of "the current
version" writes is the served version's state: the trainer's own outside a gated job, the snapshot
`_served` taken when it started (or last published) during one.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict, deque

from torch import nn

from app.checkpointing import VersionSaver
from app.errors import ApiError, describe, without_paths
from app.jobs import INTERRUPTED, Job, finite_or_none
from app.journal import JobJournal
from app.metrics import Metrics, record_match_stats
from app.model_host import ModelHost, ModelVersion
from app.publishing import Gatekeeper
from app.replaying import Replayer
from app.schemas import ClassLoss, JobCheckpoint, JobState, StepLoss
from app.settings import Settings
from app.validation import ValidationSet
from ssd_core.augment import ssd_augmentation
from ssd_core.checkpoint import CheckpointError, CheckpointInfo, CheckpointStore, LoadedCheckpoint
from ssd_core.datasets import Sample, collate
from ssd_core.ema import EMAConfig
from ssd_core.holdout import split_holdout
from ssd_core.loss import MultiBoxLoss
from ssd_core.models import SSD
from ssd_core.partial_labels import labelled_class_mask
from ssd_core.replay import ReplayMemory
from ssd_core.training import StepResult, TrainConfig, Trainer, TrainerState

logger = logging.getLogger(__name__)

ServedSnapshot = tuple[TrainerState, int]  # the trainer's weights (EMA and raw), optimizer state; steps


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
        self.replayer = Replayer(replay, settings, metrics)
        self.gatekeeper = Gatekeeper(host, validation, trainer.criterion, settings, metrics)
        self.settings = settings
        self.metrics = metrics
        self.saver = VersionSaver(store, host, settings, metrics, saved_version)
        self._served: ServedSnapshot | None = None  # during a gated job: the served version's trainer state
        self._diverged = False  # the trainer's weights differ from `_served`
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
            views = self._journal.replay()[-self.settings.job_history :]
            self.gatekeeper.restore_history(views)
            for view in views:
                if not view.status.finished:
                    view = view.model_copy(update={
                        "status": JobState.failed, "error": INTERRUPTED, "model_version": restored,
                        "finished_at": time.time(),  # when it was found interrupted
                    })
                self._jobs[view.job_id] = Job.from_view(view)
            self._compact_journal()

    # ---- jobs

    def submit(
        self, samples: list[Sample], images: list[bytes], steps: int, learning_rate: float | None, augment: bool,
        force: bool = False, replay: float | None = None,
    ) -> Job:
        """Queue a job on `samples` (decoded from `images`, the bytes as sent); 429 when the queue is
        full, 422 for too many steps or too high a learning rate. `replay`: replayed images per new
        image (None: SSD_REPLAY_RATIO)."""
        if steps > self.settings.finetune_max_steps:
            raise ApiError(422, "invalid_value", f"steps: {steps} exceeds the limit of "
                           f"{self.settings.finetune_max_steps}", "steps")
        if learning_rate is not None and learning_rate > self.settings.max_learning_rate:
            raise ApiError(422, "invalid_value", f"learning_rate: {learning_rate} exceeds the limit of "
                           f"{self.settings.max_learning_rate} (SSD_MAX_LEARNING_RATE)", "learning_rate")
        if len(samples) < self.min_images:
            raise ApiError(422, "invalid_value", f"images: {self.settings.model} has BatchNorm layers and needs at "
                           f"least {self.min_images} images per fine-tune job", "images")
        ratio = self.settings.replay_ratio if replay is None else replay
        job = Job(samples, steps, learning_rate, augment, images=images, force=force, num_images=len(samples),
                  replay_ratio=ratio)
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
        job.state, job.error, job.finished_at, job.samples, job.images = state, error, time.time(), None, None
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
            job.checkpoint = self._save_for_job()
            with self._jobs_lock:
                self._running = None
                self._finish(job, state, error)

    def _train(self, job: Job) -> tuple[JobState, str | None]:
        """Screen (gated), split off the holdout, run the job's steps; returns its final state and error.
        An accepted job's held-out images join the validation set, a rejected job's enter no store."""
        assert job.samples is not None and job.images is not None
        gated = self.settings.publish == "gated"
        held: list[tuple[bytes, Sample]] = []
        try:
            if gated:
                verdict, job.screening = self.gatekeeper.screen(job.samples, job.force)
                if not verdict.passed and not job.force:
                    return JobState.rejected, verdict.reason
            split = split_holdout(job.images, self.settings.holdout_fraction, self.min_images)
            job.held_out = len(split.held_out)
            held = [(job.images[i], job.samples[i]) for i in split.held_out]
            train = [job.samples[i] for i in split.train]
            state, error = self._steps(job, train, gated)
        except Exception as error:  # a failing job must not take the trainer thread down
            logger.exception("fine-tune job %s failed", job.job_id)
            return JobState.failed, describe(error)
        if state == JobState.succeeded:
            if held:
                self.validation.add(held, {"job": job.job_id})
                self.metrics.validation_images.set(len(self.validation))
            if job.screening is not None:
                self.gatekeeper.history.accept(job.screening.loss_l or 0.0, job.screening.loss_c or 0.0)
            self.replayer.remember(job, train)
        return state, error

    def _steps(self, job: Job, samples: list[Sample], gated: bool) -> tuple[JobState, str | None]:
        """The optimizer steps on `samples` (none when every image was held out), published per step
        or through the gate; a gated job that does not end published leaves the trainer as served."""
        if not samples:
            job.model_version = self.host.current.version
            return JobState.succeeded, None
        spec = self.host.spec
        augment = ssd_augmentation(fill=spec.pixel_mean) if job.augment else None
        per_step = self.replayer.per_step(job, len(samples))
        criterion = self.trainer.criterion
        fixed = None if augment or per_step else collate(samples, spec)  # the same batch every step
        every = self.settings.publish_every_steps
        if gated:
            with self._train_lock:
                self._served, self._diverged = self._trainer_state(), False
        try:
            for step in range(1, job.steps_total + 1):
                if job.cancel_requested:
                    return JobState.cancelled, "server shutting down" if self._stopping else "cancelled"
                replayed = self.replayer.draw(job, per_step)
                batch = samples + replayed
                images, targets = fixed or collate(batch, spec, augment)  # [B, 3, S, S], list[[n, 6]]
                class_mask = labelled_class_mask(  # [B, C] or None; augmentation drops boxes, never classes
                    [s.labelled_classes for s in batch], criterion.num_classes, criterion.background_label)
                with self._train_lock:
                    result = self.trainer.step(images, targets, lr=self._learning_rate(job), class_mask=class_mask)
                    self._diverged |= not result.skipped
                    served = self.host.current if result.skipped or gated else self.host.publish(
                        self.trainer.published, self.trainer.steps)
                self._record(job, step, result, served, len(replayed))
                if gated and self._diverged and (step == job.steps_total or (every and step % every == 0)):
                    rejection = self._judge(job)
                    if rejection is not None:
                        return JobState.rejected, rejection
            if job.skipped_steps == job.steps_total:
                return JobState.failed, "every step was skipped: non-finite loss or gradients"
            return JobState.succeeded, None
        finally:
            if gated:
                with self._train_lock:
                    if self._diverged:  # cancelled or failed: nothing of the job is served
                        self._restore_served()
                    self._served = None

    def _judge(self, job: Job) -> str | None:
        """Run the gate on the trainer's weights: publish them, or restore the served state and return why not."""
        with self._train_lock:
            decision, job.evaluation, score, digest = self.gatekeeper.evaluate(
                self.trainer.published, self.trainer.device)
            self.gatekeeper.record(decision)
            if decision.decision == "rejected":
                self._restore_served()
                return decision.reason
            published = self.host.publish(self.trainer.published, self.trainer.steps)
            self.gatekeeper.published(published, score, digest)
            self._served, self._diverged = self._trainer_state(), False
        job.model_version = published.version
        return None

    def _learning_rate(self, job: Job) -> float | None:
        """The job's rate scaled by the warm-up of a fresh model; None: the trainer's own schedule."""
        if job.learning_rate is None:
            return None
        return job.learning_rate * self.trainer.config.warmup_factor(self.trainer.steps)

    def _trainer_state(self) -> ServedSnapshot:
        """A copy of the trainer's weights and buffers (published and, EMA on, raw), optimizer state and
        step count (caller holds `_train_lock`)."""
        state = self.trainer.state()
        raw = None if state.training_weights is None else _clone(state.training_weights)
        return TrainerState(_clone(state.weights), copy.deepcopy(state.optimizer_state), raw), self.trainer.steps

    def _restore_served(self) -> None:
        """Put the trainer back to `_served`, bitwise (caller holds `_train_lock`)."""
        assert self._served is not None
        state, steps = self._served
        # the optimizer keeps what it loads
        self.trainer.restore(state.weights, copy.deepcopy(state.optimizer_state), steps, state.training_weights)
        self._diverged = False

    def _record(self, job: Job, step: int, result: StepResult, served: ModelVersion, replayed: int) -> None:
        metrics = self.metrics
        metrics.learning_rate.set(result.lr)
        metrics.images_processed.labels(route="/finetune").inc(job.num_images)
        if result.skipped:
            metrics.finetune_skipped_steps.inc()
            job.skipped_steps += 1
        else:
            metrics.finetune_steps.inc()
            record_match_stats(metrics, "finetune", result)
            step_classes = result.stats.per_class.to("cpu")
            job.class_totals = step_classes if job.class_totals is None else job.class_totals + step_classes
            job.per_class = [ClassLoss(**row) for row in job.class_totals.rows(self.settings.object_class_names())]
        job.losses.append(StepLoss(
            step=step, loss_l=finite_or_none(result.loss_l), loss_c=finite_or_none(result.loss_c),
            skipped=result.skipped, learning_rate=result.lr, model_version=served.version, replayed=replayed,
        ))
        job.steps_done = step
        job.model_version = served.version

    # ---- checkpoints, rollback and pins (app.checkpointing; callers outside the trainer thread)

    def _served_version_state(self) -> TrainerState:
        """The trainer state of the served version (caller holds `_train_lock`)."""
        return self.trainer.state() if self._served is None else self._served[0]

    def checkpoint(self) -> tuple[CheckpointInfo, bool]:
        """Save the current version now. Returns (its checkpoint, whether it was written just now)."""
        with self._train_lock:
            return self.saver.save(self._served_version_state())

    def rollback(self, version: int) -> ModelVersion:
        """Publish saved `version`'s weights as a NEW version (numbers only grow) and checkpoint it.

        409 while a job is running (it would continue from different weights), 404 for an unknown version.
        """
        store = self.saver.require_store()
        with self._train_lock:
            with self._jobs_lock:
                if self._running is not None:
                    raise ApiError(409, "trainer_busy", f"job {self._running.job_id} is running; "
                                   "cancel it or wait before rolling back", "version")
            try:
                saved = store.load(version)
            except CheckpointError as error:
                raise ApiError(404, "not_found", f"no loadable saved version {version}: {without_paths(str(error))}",
                               "version") from None
            restore_trainer(self.trainer, saved)
            published = self.host.publish(self.trainer.published, self.trainer.steps, restored_from=version)
            self.saver.save(self._served_version_state())
        return published

    def pin(self, version: int, pinned: bool) -> set[int]:
        """Pin or unpin a saved version (serialised with saves: a pin never races a prune)."""
        with self._train_lock:
            return self.saver.pin(version, pinned)

    def _save_for_job(self) -> JobCheckpoint | None:
        with self._train_lock:
            return self.saver.job_checkpoint(self._served_version_state())

    def save_if_unsaved(self) -> None:
        """Checkpoint the current version unless it is on disk (at start, at shutdown); failures are logged
        and counted, never raised. After a job: `_save_for_job`."""
        with self._train_lock:
            self.saver.save_unsaved(self._served_version_state())


def _clone(tensors: dict) -> dict:
    return {k: v.detach().clone() for k, v in tensors.items()}


def train_config(settings: Settings) -> TrainConfig:
    """The service trainer's optimizer, warm-up, clipping and EMA (README, "The online recipe")."""
    return TrainConfig(
        lr=settings.learning_rate, optimizer=settings.optimizer, warmup_steps=settings.warmup_steps,
        clip_grad_norm=settings.clip_grad_norm,
        verify_update=True, ema=EMAConfig(settings.ema_decay, settings.ema_tau),
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
    validation = ValidationSet(settings, store.directory if store is not None else None)
    replay = None
    if store is not None:
        replay = ReplayMemory(store.directory / "replay", settings.replay_max_images, settings.replay_max_bytes,
                              settings.max_image_pixels)
    worker = FinetuneWorker(host, trainer, store, validation, settings, metrics, saved_version, replay)
    worker.replayer.update_metrics()
    worker.save_if_unsaved()  # a fresh start saves its initial weights: a rollback target
    worker.load_journal()
    worker.start()
    return worker
