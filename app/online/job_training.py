"""Training one fine-tune job: screening, the holdout split, the optimizer steps, and publishing them
every step or through the gate (the queue and its thread: app.online.worker).

`SSD_PUBLISH=gated`: the job's images are screened with the served model (app.online.gatekeeper, rules in
ssd_core.online.screening and .label_quality): quarantined images are left out (trained only when
forced, never stored), and a job mostly quarantined is rejected. The job trains on the remaining images
outside the holdout (ssd_core.online.holdout, which never leaves a job too few to train; a job that
still cannot train ends `rejected` saying why) while
`_served`, a snapshot of the served version's trainer state, is kept; at its end (and every
SSD_PUBLISH_EVERY_STEPS steps) the gate (ssd_core.online.gate) publishes the trained weights or restores
`_served` bitwise (weights, BatchNorm buffers, optimizer state, step count). A cancelled or failed
gated job publishes nothing. `every_step`: a new version after every completed step. Only an
accepted job's held-out images join the validation set and its training images the replay memory.

A lock guards the trainer's weights and optimizer; others (app.online.checkpoints) take it through
`hold()`, and `served_state()` is what a checkpoint of "the current version" writes. It is the host's
`exclusive` lock, which export holds too: a trace beside a backward pass corrupts torch's global state.
With `every_step` each step's version number is put on disk before the step (`ModelHost.reserve_version`),
so a disk that cannot take it fails the job before the trainer moves away from the served version.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from app.core.errors import InvalidValue, describe
from app.core.metrics import Metrics, record_match_stats
from app.core.settings import Settings
from app.online.gatekeeper import Gatekeeper
from app.online.job_view import JobState, StepLoss
from app.online.jobs import Job, finite_or_none
from app.online.replayer import Replayer
from app.online.validation_set import ValidationSet
from app.serving.model_host import ModelHost, ModelVersion
from ssd_core.data.augment import AUGMENTATIONS, ssd_augmentation
from ssd_core.data.datasets import Sample, collate
from ssd_core.loss.partial_labels import labelled_class_mask
from ssd_core.online.holdout import split_holdout
from ssd_core.storage.checkpoint import LoadedCheckpoint
from ssd_core.training.trainer import StepResult, TrainConfig, Trainer, TrainerState

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
        self._lock = host.exclusive
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

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the trainer still for the block: no step, snapshot, gate or other holder runs meanwhile."""
        with self._lock:
            yield

    def served_state(self) -> TrainerState:
        """The trainer state of the served version (inside `hold()`): the trainer's own outside a gated job,
        the snapshot taken when it started (or last published) during one."""
        return self.trainer.state() if self._served is None else self._served[0]

    def restore(self, checkpoint: LoadedCheckpoint, version: int, save: Callable[[int], object]) -> ModelVersion:
        """Resume the trainer from saved `version` and publish its weights as a new version, all or nothing
        (inside `hold()`, with no job running).

        The next number is reserved (on disk), the trainer loads the checkpoint, `save(number)` writes the
        trainer as that version, then it is published. On any failure the trainer (weights, buffers,
        optimizer, step count) is put back bitwise, the served version is unchanged, the error is raised,
        and a number `save` may have written is never handed out."""
        number = self.host.reserve_version()
        before = self._snapshot()
        saving = False
        try:
            restore_trainer(self.trainer, checkpoint)
            saving = True
            save(number)
            return self.host.publish(self.trainer.published, self.trainer.steps, restored_from=version)
        except BaseException:
            self._put_back(before)
            if saving:
                self.host.discard_reserved_version()
            raise

    # ---- one job

    def run(self, job: Job) -> tuple[JobState, str | None]:
        """Screen (gated), split off the holdout, run the job's steps; returns its final state and error.
        An accepted job's held-out images join the validation set and its training images the replay memory;
        a rejected job's images and quarantined images enter no store."""
        assert job.samples is not None and job.images is not None
        gated = self.settings.publish == "gated"
        try:
            quarantined: tuple[int, ...] = ()
            if gated:
                screened = self._gatekeeper.screen(job.samples, job.force)
                job.set_screening(screened.view)
                if screened.rejection is not None:
                    return JobState.rejected, screened.rejection
                quarantined = screened.quarantined
            clean = [i for i in range(len(job.samples)) if i not in quarantined]
            fill = self._replayer.available(job)
            images = [job.images[i] for i in clean]
            validating = [i for i, image in enumerate(images) if self.validation.holds(image)]
            split = split_holdout(images, self.settings.holdout_fraction, self._min_images, fill, validating)
            job.set_held_out(len(split.held_out))
            held = [(job.images[clean[i]], job.samples[clean[i]]) for i in split.held_out]
            train = [job.samples[clean[i]] for i in split.train]
            forced = [job.samples[i] for i in quarantined] if job.force else []  # trained, never stored
            shortfall = self._shortfall(len(train) + len(forced), fill, len(quarantined), len(held))
            if shortfall is not None:
                return JobState.rejected, shortfall
            state, error = self._steps(job, train + forced, gated)
        except Exception as error:  # a failing job must not take the trainer thread down
            logger.exception("fine-tune job %s failed", job.job_id)
            return JobState.failed, describe(error)
        if state == JobState.succeeded:
            self._accepted(job, held, train)
        return state, error

    def _shortfall(self, images: int, fill: int, quarantined: int, held: int) -> str | None:
        """Why a job left with `images` to train on (the replay memory adding `fill` per step) cannot train, or
        None when it can: a step needs at least one of the job's images and `_min_images` in all."""
        if images >= 1 and images + fill >= self._min_images:
            return None
        return (f"nothing trained: {images} of the job's images left to train on ({quarantined} quarantined, {held} "
                f"held out for validation) and {fill} replayed per step, but {self.settings.model} needs at least "
                f"{self._min_images} images per step; send more images (or fix the quarantined ones)")

    def _accepted(self, job: Job, held: list[tuple[bytes, Sample]], train: list[Sample]) -> None:
        """A succeeded job's held-out images join the validation set and its training images the replay memory."""
        if held:
            self.validation.add(held, {"job": job.job_id})
            self.metrics.validation_images.set(len(self.validation))
        self._replayer.remember(job, train)

    def _steps(self, job: Job, samples: list[Sample], gated: bool) -> tuple[JobState, str | None]:
        """The optimizer steps on `samples` (at least one), published per step or through the gate; a gated job
        that does not end published leaves the trainer as served."""
        spec = self.host.spec
        augment = ssd_augmentation(fill=spec.pixel_mean, config=AUGMENTATIONS[job.augment]) if job.augment else None
        per_step = self._replayer.per_step(job, len(samples))
        criterion = self.trainer.criterion
        fixed = None if augment or per_step else collate(samples, spec)  # the same batch every step
        every = self.settings.publish_every_steps
        job.set_warmup(warmup_note(self.trainer.config, self.trainer.steps, job.steps_total, job.learning_rate))
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
                    if not gated:  # the number this step publishes under, on disk before the step moves the trainer
                        self.host.reserve_version()
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
        """The job's rate scaled by the warm-up of a fresh optimizer; None: the trainer's own schedule."""
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
        self._put_back(self._served)
        self._diverged = False

    def _put_back(self, snapshot: ServedSnapshot) -> None:
        """Put the trainer back to a `_snapshot`, bitwise (caller holds `_lock`)."""
        state, steps = snapshot
        # the optimizer keeps what it loads
        self.trainer.restore(state.weights, copy.deepcopy(state.optimizer_state), steps, state.training_weights)

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


def warmup_note(config: TrainConfig, trained_steps: int, steps: int, learning_rate: float | None) -> str | None:
    """What a fresh optimizer's warm-up does to a job of `steps` steps starting after `trained_steps`: the steps
    whose learning rate it lowers and their rates, or None when it is over."""
    limited = min(steps, config.warmup_steps - trained_steps)
    if limited <= 0:
        return None
    rate = config.lr if learning_rate is None else learning_rate
    first, last = (rate * config.warmup_factor(trained_steps + k) for k in (0, limited - 1))
    return (f"the warm-up of a fresh optimizer lowered the learning rate of steps 1-{limited} to {first:.2g}..{last:.2g} "
            f"(of {rate:g}): the trainer has taken {trained_steps} of SSD_WARMUP_STEPS={config.warmup_steps} steps; "
            "it ends by itself as jobs train (send more steps to end it sooner)")
