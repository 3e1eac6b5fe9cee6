"""A fine-tune job's public view (`JobView`): its state, per-step losses, screening, evaluation, replay and
checkpoint, as `GET /finetune/{job_id}` answers it and the job journal records it."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

REPLAY_KEYS_SHOWN = 100  # bounds a job's view (and journal record) whatever the memory's size


class JobSource(StrEnum):
    """Who asked for a job: a client of `POST /finetune`, or Label Studio's annotation stream."""

    api = "api"
    label_studio = "label-studio"


class LabelStudioAnnotation(BaseModel):
    """The Label Studio annotation an annotation-stream image was trained from."""

    project_id: int
    task_id: int
    annotation_id: int


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


class QuarantineIssue(BaseModel):
    """One disagreement between an image's annotation and the served model."""

    box: int | None = Field(description="index of the annotated box; null for an overlooked object or a loss outlier")
    issue: Literal["swapped_label", "bad_location", "overlooked_object", "loc_loss", "conf_loss"] = Field(
        description="swapped_label: a confident detection of another class sits on the box; bad_location: a "
        "confident detection of its class overlaps it poorly; overlooked_object: a confident detection no box "
        "covers; loc_loss / conf_loss: the image's loss part above the threshold")
    model_box: list[float] | None = Field(None, description="the model's detection (pixel x1, y1, x2, y2)")
    model_label: int | None = Field(None, description="its 0-based class")
    model_class: str | None = None
    model_score: float | None = None
    value: float | None = Field(None, description="loss outliers: the image's loss part per matched prior")
    threshold: float | None = Field(None, description="loss outliers: the most it may be")


class QuarantinedImage(BaseModel):
    image: int = Field(description="0-based index of the image in the job")
    quarantined: bool = Field(description="false: the issues were too few to quarantine it (listed for the pipeline)")
    issues: list[QuarantineIssue]


class JobScreening(BaseModel):
    """The served model on the job's images before its first step, against its losses on the validation set
    now, and (once competent) each box against its confident detections."""

    model_version: int
    loss: float | None = Field(description="loss_l + loss_c of the batch, as POST /score-loss says (null when not "
                               "finite)")
    loss_l: float | None
    loss_c: float | None
    losses_checked: bool = Field(False, description="whether per-image loss screening ran (the served model is "
                                 "competent on the validation set)")
    labels_checked: bool = Field(False, description="whether the per-box label checks ran")
    quiet_reason: str | None = Field(None, description="why screening did not judge")
    baseline_l: float | None = Field(None, description="the served model's median loss_l per matched prior on the "
                                     "validation set now")
    baseline_c: float | None = None
    threshold_l: float | None = Field(None, description="SSD_SCREEN_RATIO x baseline_l: the most an image may score")
    threshold_c: float | None = None
    quarantined: int = Field(0, description="images quarantined: not trained on (unless forced), never added to the "
                             "validation set or the replay memory")
    images: list[QuarantinedImage] = Field(default_factory=list, description="the images with any issue")
    passed: bool
    forced: bool = Field(description='"force": true: quarantined images trained, a rejection not applied')
    seconds: float | None = Field(None, description="time spent screening (the served model on the job's images "
                                  "and on validation images new to it, the checks)")


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
                                          "best the gate published since the served version's line began, scored "
                                          "on the validation set as it is now (the served one unless a later one "
                                          "scored lower)")
    delta: float | None = Field(None, description="candidate - reference mAP@0.5 on the validation set "
                                "(published iff >= -margin)")
    loss_increase: float | None = Field(None, description="paired test: mean per-image validation loss (per "
                                        "matched prior) of the candidate minus the reference's")
    loss_bound: float | None = Field(None, description="its lower bound (mean - SSD_GATE_PAIRED_Z x SE): rejected "
                                     "when above SSD_GATE_LOSS_TOLERANCE x the reference's mean")
    quality_change: float | None = Field(None, description="paired test: mean per-image change of the image's own "
                                         "average precision (its detections ranked by score)")
    quality_bound: float | None = Field(None, description="its upper bound: rejected when below "
                                        "-SSD_GATE_DETECTION_TOLERANCE")
    margin: float | None = Field(description="mAP@0.5 the candidate could lose and still publish: "
                                 "SSD_GATE_TOLERANCE + SSD_GATE_NOISE_Z x the bootstrap SE")
    noise: float | None = Field(description="bootstrap standard error of the candidate - served mAP@0.5")
    reason: str | None
    seconds: float = Field(description="time spent evaluating")


class JobView(BaseModel):
    job_id: str
    status: JobState
    source: JobSource = Field(JobSource.api, description="api: POST /finetune; label-studio: the annotation stream")
    label_studio: list[LabelStudioAnnotation] | None = Field(
        None, description="label-studio jobs: the Label Studio project, task and annotation of each image, in the "
        "job's image order")
    steps_done: int
    steps_total: int
    skipped_steps: int
    num_images: int
    learning_rate: float | None
    warmup: str | None = Field(None, description="set when a fresh optimizer's warm-up (SSD_WARMUP_STEPS) lowered the "
                               "learning rate of this job's steps: which steps, the rates they ran at, and what to do")
    augment: bool
    augmentation: Literal["flip", "ssd"] | None = Field(
        None, description="the augmentation the job trained with: `ssd` (SSD's, what `augment: true` asks for) or "
        "`flip` (photometric and horizontal flip: the annotation stream's SSD_STREAM_AUGMENT); null: none")
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
