"""One fine-tune job: what was asked, its state, and its public view (`JobView`)."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

from app.online.job_view import (
    ClassLoss,
    JobCheckpoint,
    JobEvaluation,
    JobReplay,
    JobScreening,
    JobState,
    JobView,
    StepLoss,
)
from ssd_core.data.datasets import Sample
from ssd_core.loss.stats import ClassStats

INTERRUPTED = "interrupted: the server stopped before the job finished"


def finite_or_none(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


@dataclass(eq=False)
class Job:
    """One fine-tune request. `samples` and `images` (the bytes as sent, for the holdout and the
    validation set) are dropped once the job has finished."""

    samples: list[Sample] | None
    steps_total: int
    learning_rate: float | None
    augment: bool
    images: list[bytes] | None = None
    force: bool = False
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
        job = cls(None, view.steps_total, view.learning_rate, view.augment, force=view.force, job_id=view.job_id,
                  state=view.status, steps_done=view.steps_done, skipped_steps=view.skipped_steps,
                  losses=view.losses, model_version=view.model_version, error=view.error,
                  cancel_requested=view.cancel_requested, created_at=view.created_at, started_at=view.started_at,
                  finished_at=view.finished_at, num_images=view.num_images, checkpoint=view.checkpoint,
                  held_out=view.held_out, screening=view.screening, evaluation=view.evaluation,
                  replay_ratio=view.replay.ratio if view.replay else 0.0, replay=view.replay, per_class=view.per_class)
        job.finished.set_result(None)
        return job

    def view(self) -> JobView:
        return JobView(
            job_id=self.job_id, status=self.state, steps_done=self.steps_done, steps_total=self.steps_total,
            skipped_steps=self.skipped_steps, num_images=self.num_images, learning_rate=self.learning_rate,
            augment=self.augment, losses=list(self.losses), model_version=self.model_version, error=self.error,
            cancel_requested=self.cancel_requested, created_at=self.created_at, started_at=self.started_at,
            finished_at=self.finished_at, checkpoint=self.checkpoint, force=self.force, held_out=self.held_out,
            screening=self.screening, evaluation=self.evaluation,
            replay=self.replay.model_copy(deep=True) if self.replay else None, per_class=list(self.per_class),
        )
