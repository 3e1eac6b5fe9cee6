"""A fine-tune job's public view (`JobView`): its state, per-step losses, screening, evaluation, replay and
checkpoint, as `GET /finetune/{job_id}` answers it and the job journal records it."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

REPLAY_KEYS_SHOWN = 100  # bounds a job's view (and journal record) whatever the memory's size


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    rejected = "rejected"  # by screening before the first step, or by the publish gate

    @property
    def finished(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled, JobState.rejected)

class ClassLoss(BaseModel):
    """Match and loss figures of one object class over a batch (or a fine-tune job's steps)."""

    label: int = Field(description="0-based object class (background excluded)")
    class_name: str
    num_ground_truth: int = Field(description="boxes of the class, difficult ones included")
    num_positives: int = Field(description="priors matched to a box of the class")
    num_forced_matches: int = Field(description="boxes of the class no prior reached the IoU threshold for, "
                                    "matched only by the forced step (the priors fit them badly)")
    positives_per_box: float = Field(description="num_positives / num_ground_truth (0 without boxes)")
    mean_matched_iou: float = Field(description="mean IoU of the class's positives with their boxes (0 without)")
    loss_l: float = Field(description="loc loss of the class's positives / N (its share of loss_l)")
    loss_c: float = Field(description="conf loss of the class's positives / N; the negatives' part is "
                          "loss_c_negatives")

class StepLoss(BaseModel):
    step: int = Field(description="1-based step of this job")
    loss_l: float | None = Field(description="null when the loss was not finite")
    loss_c: float | None
    skipped: bool = Field(description="non-finite loss or gradients: weights left unchanged")
    learning_rate: float | None
    model_version: int = Field(description="version published by this step (unchanged when skipped)")
    replayed: int = Field(0, description="replayed images trained with the job's images in this step")


class JobCheckpoint(BaseModel):
    """Whether a finished job's weights are on disk (a restart resumes from them)."""

    saved: bool = Field(description="false: the steps are served but not yet durable (the write failed)")
    version: int = Field(description="the model version when the job ended: the one written, or that failed")
    error: str | None = Field(description="why the write failed, else null")


class JobReplay(BaseModel):
    """What a job replayed from the replay memory (earlier accepted jobs' training images)."""

    ratio: float = Field(description="replayed images per new image asked for")
    memory_images: int = Field(description="images in the replay memory when the job started")
    images: int = Field(description="replayed images over all steps (an image drawn twice counts twice)")
    per_class: dict[str, int] = Field(description="replayed images containing each class (no_object: none)")
    keys: list[str] = Field(description=f"content keys (sha256 of the stored PNG) of the distinct replayed "
                            f"images, the first {REPLAY_KEYS_SHOWN}")


class JobScreening(BaseModel):
    """The served model's loss on the job's batch before its first step, against accepted jobs'."""

    model_version: int
    loss: float | None = Field(description="loss_l + loss_c (null when not finite)")
    loss_l: float | None
    loss_c: float | None
    median: float | None = Field(description="median pre-training loss of the last accepted jobs; null while "
                                 "fewer than 5 are known")
    threshold: float | None = Field(description="SSD_SCREEN_RATIO x median: the most a batch may score")
    jobs: int = Field(description="accepted jobs the median is over")
    passed: bool
    forced: bool = Field(description='"force": true: the verdict was not applied')


class ServedFigures(BaseModel):
    version: int
    map_50: float = Field(description="mAP@0.5 on the validation set (torchmetrics)")
    loss: float = Field(description="mean MultiBoxLoss (loss_l + loss_c) per image")


class CandidateFigures(BaseModel):
    map_50: float
    loss: float | None = Field(description="null when not finite")


class JobEvaluation(BaseModel):
    """The publish gate's evaluation of a job's weights (the last one, for SSD_PUBLISH_EVERY_STEPS)."""

    validation_images: int
    validation_hash: str = Field(description="sha256 over the validation set's images and annotations")
    served: ServedFigures | None = Field(description="null when ungated")
    candidate: CandidateFigures | None
    decision: Literal["published", "rejected", "ungated"]
    reference_version: int | None = Field(None, description="the version the candidate was judged against: the "
                                          "best the gate published on this validation set since the served "
                                          "version's line began (the served one unless a later one scored lower)")
    delta: float | None = Field(None, description="candidate - reference mAP@0.5 on the validation set "
                                "(published iff >= -margin)")
    margin: float | None = Field(description="mAP@0.5 the candidate could lose and still publish: "
                                 "SSD_GATE_TOLERANCE + SSD_GATE_NOISE_Z x the bootstrap SE")
    noise: float | None = Field(description="bootstrap standard error of the candidate - served mAP@0.5")
    reason: str | None
    seconds: float = Field(description="time spent evaluating")


class JobView(BaseModel):
    job_id: str
    status: JobState
    steps_done: int
    steps_total: int
    skipped_steps: int
    num_images: int
    learning_rate: float | None
    augment: bool
    losses: list[StepLoss]
    model_version: int | None = Field(description="version after the job's last completed step")
    error: str | None
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    checkpoint: JobCheckpoint | None = Field(
        None, description="set when the job ends and a checkpoint directory is configured: whether the "
        "model version it left is saved")
    replay: JobReplay | None = Field(None, description="null: the job replayed nothing (ratio 0 or empty memory)")
    force: bool = False
    held_out: int = Field(0, description="images kept for validation instead of training (join the validation "
                          "set once the job is accepted)")
    screening: JobScreening | None = None
    evaluation: JobEvaluation | None = None
    per_class: list[ClassLoss] = Field(
        default_factory=list, description="per object class over the job's completed steps, pooled: counts and "
        "loss sums added up over the steps, losses divided by the summed N (empty before the first step)")
