"""Training one fine-tune job: screening, the holdout split, the optimizer steps, and publishing them
every step or through the gate (the queue and its thread: app.online.worker).

`SSD_PUBLISH=gated`: the batch is screened with the served model (app.online.gatekeeper, rule in
ssd_core.online.screening); the job trains on the images outside the holdout (ssd_core.online.holdout) while
`_served`, a snapshot of the served version's trainer state, is kept; at its end (and every
SSD_PUBLISH_EVERY_STEPS steps) the gate (ssd_core.online.gate) publishes the trained weights or restores
`_served` bitwise (weights, BatchNorm buffers, optimizer state, step count). A cancelled or failed
gated job publishes nothing. `every_step`: a new version after every completed step. Only an
accepted job's held-out images join the validation set and its training images the replay memory.

A lock guards the trainer's weights and optimizer; others (app.online.checkpoints) take it through
`hold()`, and `served_state()` is what a checkpoint of "the current version" writes.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from app.core.errors import InvalidValue, describe
from app.core.metrics import Metrics, record_match_stats
from app.core.settings import Settings
from app.online.gatekeeper import Gatekeeper
from app.online.job_view import JobState, JobView, StepLoss
from app.online.jobs import Job, finite_or_none
from app.online.replayer import Replayer
from app.online.validation_set import ValidationSet
from app.serving.model_host import ModelHost, ModelVersion
from ssd_core.data.augment import ssd_augmentation
from ssd_core.data.datasets import Sample, collate
from ssd_core.loss.partial_labels import labelled_class_mask
from ssd_core.online.holdout import split_holdout
from ssd_core.storage.checkpoint import LoadedCheckpoint
from ssd_core.training.trainer import StepResult, Trainer, TrainerState

logger = logging.getLogger(__name__)

ServedSnapshot = tuple[TrainerState, int]  # the trainer's weights (EMA and raw), optimizer state; steps


class JobTraining:
    """Args: host (publishes versions), trainer (equal to `host.current` on entry), validation,
    replayer; stopping: whether the server is shutting down (a cancelled job says so)."""

    def __init__(
        self, host: ModelHost, trainer: Trainer, validation: ValidationSet, replayer: Replayer, settings: Settings,
        metrics: Metrics, stopping: Callable[[], bool],
    ) -> None:
        self.host = host
        self.trainer = trainer
        self.validation = validation
        self._replayer = replayer
        self._gatekeeper = Gatekeeper(host, validation, trainer.criterion, settings, metrics)
        self.settings = settings
        self.metrics = metrics
        self._lock = threading.Lock()
        self._stopping = stopping
        self._served: ServedSnapshot | None = None  # during a gated job: the served version's trainer state
        self._diverged = False  # the trainer's weights differ from `_served`
        # BatchNorm cannot train on one image (a 1x1 feature map gives one value per channel)
        batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trainer.model.modules())
        self._min_images = 2 if batch_norm else 1

    # ---- what the queue and the checkpoint operations ask

    def require_images(self, count: int) -> None:
        """Raises InvalidValue when a job of `count` images is too small to train."""
        if count < self._min_images:
            raise InvalidValue("images", f"{self.settings.model} has BatchNorm layers and needs at "
                               f"least {self._min_images} images per fine-tune job")

    def restore_screening(self, views: list[JobView]) -> None:
        """Refill the screening window from journalled jobs (oldest first)."""
        self._gatekeeper.restore_history(views)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the trainer still for the block: no step, snapshot, gate or other holder runs meanwhile."""
        with self._lock:
            yield

    def served_state(self) -> TrainerState:
        """The trainer state of the served version (inside `hold()`): the trainer's own outside a gated job,
        the snapshot taken when it started (or last published) during one."""
        return self.trainer.state() if self._served is None else self._served[0]

    def restore(self, checkpoint: LoadedCheckpoint, version: int) -> ModelVersion:
        """Resume the trainer from saved `version` and publish its weights as a new version (inside `hold()`,
        with no job running)."""
        restore_trainer(self.trainer, checkpoint)
        return self.host.publish(self.trainer.published, self.trainer.steps, restored_from=version)

    # ---- one job

    def run(self, job: Job) -> tuple[JobState, str | None]:
        """Screen (gated), split off the holdout, run the job's steps; returns its final state and error.
        An accepted job's held-out images join the validation set, a rejected job's enter no store."""
        assert job.samples is not None and job.images is not None
        gated = self.settings.publish == "gated"
        try:
            if gated:
                screening, rejection = self._gatekeeper.screen(job.samples, job.force)
                job.set_screening(screening)
                if rejection is not None:
                    return JobState.rejected, rejection
            split = split_holdout(job.images, self.settings.holdout_fraction, self._min_images)
            job.set_held_out(len(split.held_out))
            held = [(job.images[i], job.samples[i]) for i in split.held_out]
            train = [job.samples[i] for i in split.train]
            state, error = self._steps(job, train, gated)
        except Exception as error:  # a failing job must not take the trainer thread down
            logger.exception("fine-tune job %s failed", job.job_id)
            return JobState.failed, describe(error)
        if state == JobState.succeeded:
            self._accepted(job, held, train)
        return state, error

    def _accepted(self, job: Job, held: list[tuple[bytes, Sample]], train: list[Sample]) -> None:
        """A succeeded job's held-out images join the validation set, its screening loss the screening
        window and its training images the replay memory."""
        if held:
            self.validation.add(held, {"job": job.job_id})
            self.metrics.validation_images.set(len(self.validation))
        self._gatekeeper.accept(job.screening)
        self._replayer.remember(job, train)

    def _steps(self, job: Job, samples: list[Sample], gated: bool) -> tuple[JobState, str | None]:
        """The optimizer steps on `samples` (none when every image was held out), published per step
        or through the gate; a gated job that does not end published leaves the trainer as served."""
        if not samples:
            job.set_model_version(self.host.current.version)
            return JobState.succeeded, None
        spec = self.host.spec
        augment = ssd_augmentation(fill=spec.pixel_mean) if job.augment else None
        per_step = self._replayer.per_step(job, len(samples))
        criterion = self.trainer.criterion
        fixed = None if augment or per_step else collate(samples, spec)  # the same batch every step
        every = self.settings.publish_every_steps
        with self._keeping_served(gated):
            for step in range(1, job.steps_total + 1):
                if job.cancel_requested:
                    return JobState.cancelled, "server shutting down" if self._stopping() else "cancelled"
                replayed = self._replayer.draw(job, per_step)
                batch = samples + replayed
                images, targets = fixed or collate(batch, spec, augment)  # [B, 3, S, S], list[[n, 6]]
                class_mask = labelled_class_mask(  # [B, C] or None; augmentation drops boxes, never classes
                    [s.labelled_classes for s in batch], criterion.num_classes, criterion.background_label)
                with self._lock:
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

    @contextmanager
    def _keeping_served(self, gated: bool) -> Iterator[None]:
        """During a gated job keep `_served`, a snapshot of the served version's trainer state; a job that
        ends with the trainer diverged from it (cancelled or failed: nothing of the job is served) leaves
        the trainer restored to it, bitwise."""
        if not gated:
            yield
            return
        with self._lock:
            self._served, self._diverged = self._snapshot(), False
        try:
            yield
        finally:
            with self._lock:
                if self._diverged:
                    self._restore_served()
                self._served = None

    def _judge(self, job: Job) -> str | None:
        """Run the gate on the trainer's weights: it publishes them, or the served state is restored and
        the gate's reason returned."""
        with self._lock:
            outcome = self._gatekeeper.gate(self.trainer.published, self.trainer.device, self.trainer.steps)
            if outcome.published is None:
                self._restore_served()
            else:
                self._served, self._diverged = self._snapshot(), False
        job.set_evaluation(outcome.evaluation)
        if outcome.published is None:
            return outcome.reason
        job.set_model_version(outcome.published.version)
        return None

    def _learning_rate(self, job: Job) -> float | None:
        """The job's rate scaled by the warm-up of a fresh model; None: the trainer's own schedule."""
        if job.learning_rate is None:
            return None
        return job.learning_rate * self.trainer.config.warmup_factor(self.trainer.steps)

    def _snapshot(self) -> ServedSnapshot:
        """A copy of the trainer's weights and buffers (published and, EMA on, raw), optimizer state and
        step count (caller holds `_lock`)."""
        state = self.trainer.state()
        raw = None if state.training_weights is None else _clone(state.training_weights)
        return TrainerState(_clone(state.weights), copy.deepcopy(state.optimizer_state), raw), self.trainer.steps

    def _restore_served(self) -> None:
        """Put the trainer back to `_served`, bitwise (caller holds `_lock`)."""
        assert self._served is not None
        state, steps = self._served
        # the optimizer keeps what it loads
        self.trainer.restore(state.weights, copy.deepcopy(state.optimizer_state), steps, state.training_weights)
        self._diverged = False

    def _record(self, job: Job, step: int, result: StepResult, served: ModelVersion, replayed: int) -> None:
        metrics = self.metrics
        metrics.learning_rate.set(result.lr)
        metrics.images_processed.labels(route="/finetune").inc(job.num_images)
        class_stats = None
        if result.skipped:
            metrics.finetune_skipped_steps.inc()
        else:
            metrics.finetune_steps.inc()
            record_match_stats(metrics, "finetune", result)
            class_stats = result.stats.per_class.to("cpu")
        loss = StepLoss(
            step=step, loss_l=finite_or_none(result.loss_l), loss_c=finite_or_none(result.loss_c),
            skipped=result.skipped, learning_rate=result.lr, model_version=served.version, replayed=replayed,
        )
        job.record_step(loss, class_stats, self.settings.object_class_names())


def restore_trainer(trainer: Trainer, checkpoint: LoadedCheckpoint) -> None:
    """Resume `trainer` from a checkpoint: served (EMA) weights, raw weights, optimizer, step count."""
    trainer.restore(checkpoint.state_dict, checkpoint.optimizer_state, int(checkpoint.meta.get("step", 0)),
                    checkpoint.training_weights)


def _clone(tensors: dict) -> dict:
    return {k: v.detach().clone() for k, v in tensors.items()}
