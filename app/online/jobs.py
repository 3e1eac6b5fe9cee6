"""One fine-tune job: what was asked, its state, and its public view (`JobView`).

`Job` owns its lifecycle: the queue (app.online.worker) and the training (app.online.job_training,
app.online.replayer) change a job only through its methods, which check that the job is in a state the
change belongs to (queued -> running -> a final state, or queued -> cancelled)."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

from app.core.errors import Conflict
from app.online.job_view import (
    REPLAY_KEYS_SHOWN,
    ClassLoss,
    JobCheckpoint,
    JobEvaluation,
    JobReplay,
    JobScreening,
    JobSource,
    JobState,
    JobView,
    LabelStudioAnnotation,
    StepLoss,
)
from ssd_core.data.datasets import Sample
from ssd_core.loss.stats import ClassStats

_NEXT_STATES = {
    JobState.queued: {JobState.running, JobState.cancelled},
    JobState.running: {JobState.succeeded, JobState.failed, JobState.cancelled, JobState.rejected},
}


def finite_or_none(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


class JobTransitionError(RuntimeError):
    """A change a job's state does not allow (a bug in the caller, not a client's mistake)."""


@dataclass(eq=False)
class Job:
    """One fine-tune request. `samples` and `images` (the bytes as sent, for the holdout and the
    validation set) are dropped once the job has finished. Fields are read freely and written only by
    the methods below."""

    samples: list[Sample] | None
    steps_total: int
    learning_rate: float | None
    augment: str | None  # a name in ssd_core.data.augment.AUGMENTATIONS; None: the images as sent
    images: list[bytes] | None = None
    force: bool = False
    source: JobSource = JobSource.api
    label_studio: list[LabelStudioAnnotation] | None = None  # the annotation stream's origin of each image
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
    held_out: int = 0
    warmup: str | None = None
    screening: JobScreening | None = None
    evaluation: JobEvaluation | None = None
    replay_ratio: float = 0.0
    replay: JobReplay | None = None  # set when the job replays anything
    per_class: list[ClassLoss] = field(default_factory=list)  # from class_totals, for the view
    class_totals: ClassStats | None = None  # pooled over the completed steps (not kept across restarts)
    finished: Future = field(default_factory=Future)  # result set when the job reaches a final state

    @classmethod
    def from_view(cls, view: JobView) -> Job:
        """A finished job restored from the journal (no images)."""
        augment = view.augmentation or ("ssd" if view.augment else None)
        job = cls(None, view.steps_total, view.learning_rate, augment, force=view.force, source=view.source,
                  label_studio=view.label_studio, job_id=view.job_id,
                  state=view.status, steps_done=view.steps_done, skipped_steps=view.skipped_steps,
                  losses=view.losses, model_version=view.model_version, error=view.error,
                  cancel_requested=view.cancel_requested, created_at=view.created_at, started_at=view.started_at,
                  finished_at=view.finished_at, num_images=view.num_images, checkpoint=view.checkpoint,
                  held_out=view.held_out, warmup=view.warmup, screening=view.screening, evaluation=view.evaluation,
                  replay_ratio=view.replay.ratio if view.replay else 0.0, replay=view.replay, per_class=view.per_class)
        job.finished.set_result(None)
        return job

    def view(self) -> JobView:
        return JobView(
            job_id=self.job_id, status=self.state, source=self.source,
            label_studio=list(self.label_studio) if self.label_studio is not None else None,
            steps_done=self.steps_done, steps_total=self.steps_total,
            skipped_steps=self.skipped_steps, num_images=self.num_images, learning_rate=self.learning_rate,
            augment=self.augment is not None, augmentation=self.augment, losses=list(self.losses),
            model_version=self.model_version, error=self.error,
            cancel_requested=self.cancel_requested, created_at=self.created_at, started_at=self.started_at,
            finished_at=self.finished_at, checkpoint=self.checkpoint, force=self.force, held_out=self.held_out,
            warmup=self.warmup, screening=self.screening, evaluation=self.evaluation,
            replay=self.replay.model_copy(deep=True) if self.replay else None, per_class=list(self.per_class),
        )

    # ---- the lifecycle (the queue's side)

    def start(self) -> None:
        """queued -> running."""
        self._move(JobState.running)
        self.started_at = time.time()

    def request_cancel(self) -> None:
        """Ask the job to stop after its current step (the trainer checks `cancel_requested`).

        Raises Conflict when the job has already finished."""
        if self.state.finished:
            raise Conflict("job_finished", f"job {self.job_id} already {self.state.value}", "job_id")
        self.cancel_requested = True

    def finish(self, state: JobState, error: str | None = None) -> None:
        """Move to the final `state` (a queued job can only be cancelled) and drop the images."""
        if not state.finished:
            raise JobTransitionError(f"{state.value} is not a final state")
        self._move(state)
        self.error, self.finished_at, self.samples, self.images = error, time.time(), None, None

    def notify_finished(self) -> None:
        """Wake those waiting on `finished`; the caller has made the final state durable first."""
        if not self.state.finished:
            raise JobTransitionError(f"job {self.job_id} is {self.state.value}, not finished")
        self.finished.set_result(None)

    def set_checkpoint(self, checkpoint: JobCheckpoint | None) -> None:
        """Whether the version the job left is on disk (known before the job's final state)."""
        self._require_running("record its checkpoint")
        self.checkpoint = checkpoint

    # ---- what the training records while the job runs

    def set_screening(self, screening: JobScreening) -> None:
        self._require_running("record its screening")
        self.screening = screening

    def set_warmup(self, note: str | None) -> None:
        self.warmup = note

    def set_held_out(self, images: int) -> None:
        self._require_running("record its holdout")
        self.held_out = images

    def set_evaluation(self, evaluation: JobEvaluation) -> None:
        self._require_running("record the gate's evaluation")
        self.evaluation = evaluation

    def set_model_version(self, version: int) -> None:
        """The version the job's weights are served as (or, none published, the one served)."""
        self._require_running("record its model version")
        self.model_version = version

    def record_step(self, loss: StepLoss, class_stats: ClassStats | None, class_names: list[str]) -> None:
        """A step ended: `loss` is its line, `class_stats` (None for a skipped step) join the pooled per-class
        figures (`class_names`: the object classes, for the view)."""
        self._require_running("record a step")
        if loss.skipped:
            self.skipped_steps += 1
        else:
            assert class_stats is not None
            self.class_totals = class_stats if self.class_totals is None else self.class_totals + class_stats
            self.per_class = [ClassLoss(**row) for row in self.class_totals.rows(class_names)]
        self.losses.append(loss)
        self.steps_done = loss.step
        self.model_version = loss.model_version

    def open_replay(self, memory_images: int) -> None:
        """The job's steps will replay from a memory of `memory_images` images."""
        self._require_running("open its replay")
        self.replay = JobReplay(ratio=self.replay_ratio, memory_images=memory_images, images=0, per_class={},
                                keys=[])

    def record_replayed(self, classes: list[list[str]], keys: list[str]) -> None:
        """A step replayed images showing `classes` (per image), stored under `keys`; the view keeps the
        first REPLAY_KEYS_SHOWN distinct keys."""
        self._require_running("record replayed images")
        if self.replay is None:
            raise JobTransitionError(f"job {self.job_id} replays nothing")
        view = self.replay
        view.images += len(classes)
        for names in classes:
            for name in names:
                view.per_class[name] = view.per_class.get(name, 0) + 1
        shown = set(view.keys)
        view.keys.extend(k for k in dict.fromkeys(keys) if k not in shown)
        del view.keys[REPLAY_KEYS_SHOWN:]

    def _move(self, state: JobState) -> None:
        if state not in _NEXT_STATES.get(self.state, set()):
            raise JobTransitionError(f"job {self.job_id} is {self.state.value}: it cannot become {state.value}")
        self.state = state

    def _require_running(self, change: str) -> None:
        if self.state != JobState.running:
            raise JobTransitionError(f"job {self.job_id} is {self.state.value}: cannot {change}")
