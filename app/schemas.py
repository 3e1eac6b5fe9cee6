"""Request and response bodies (pydantic). Boxes are (x1, y1, x2, y2); labels are 0-based object
classes not counting background. Non-finite numbers are rejected at parse time, naming the field."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from annotated_types import Len
from pydantic import Base64Bytes, BaseModel, BeforeValidator, ConfigDict, Field

Box = Annotated[list[float], Len(4, 4)]  # (x1, y1, x2, y2)
_DATA_URL = re.compile(r"data:[^,]*;base64,", re.IGNORECASE)


def _strip_data_url(value: object) -> object:
    """`data:image/png;base64,iVBOR...` (what browsers and canvas.toDataURL produce) -> `iVBOR...`."""
    if isinstance(value, str) and (match := _DATA_URL.match(value)):
        return value[match.end():]
    return value


# base64 image bytes, with or without a data URL prefix (the decoder tells PNG from JPEG by content)
ImageBase64 = Annotated[Base64Bytes, BeforeValidator(_strip_data_url)]
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


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


PositiveFinite = Annotated[float, Field(gt=0)]  # finite: Request forbids inf and NaN
LABELLED_CLASSES_DOC = (
    "partial labels: the 0-based object classes this image's boxes are complete for (every box's label "
    "among them); its confidence loss uses the softmax over background and these classes only, so an "
    "unboxed object of another class is not taught as background. null: labelled for every class"
)
LabelledClasses = list[int] | None


class LossOptions(Request):
    """MultiBoxLoss options; the defaults are the seed's `(num_classes, 0.5, True, 0, True, 3, 0.5, False)`.

    The bounds are `MultiBoxLoss`'s own (its ValueError checks), so a bad option is a 422 naming
    `options.<name>`; only `bkg_label < num_classes` depends on the model and is checked with the batch.
    """

    overlap_thresh: float = Field(0.5, gt=0, le=1)
    prior_for_matching: bool = True
    bkg_label: int = Field(0, ge=0, description="index of background in conf; < num_classes")
    neg_mining: bool = True
    neg_pos: int = Field(3, ge=0)
    neg_overlap: float = Field(0.5, gt=0, le=1)
    encode_target: bool = False
    variance: tuple[PositiveFinite, PositiveFinite] = (0.1, 0.2)
    loc_weight: float = Field(1.0, ge=0)
    match_type: Literal["per_prediction", "bipartite"] = "per_prediction"


class TargetBox(Request):
    box: Box = Field(description="normalised (x1, y1, x2, y2) in [0, 1]")
    label: int
    difficult: bool = False


class Predictions(Request):
    loc: list[list[Box]] = Field(description="[B][P][4] encoded offsets")
    conf: list[list[list[float]]] = Field(description="[B][P][C] class logits, C = num_classes")


class ScoreLossRequest(Request):
    """`POST /score-loss` as JSON: either `predictions` + `targets` (+ `priors`), or `images`."""

    predictions: Predictions | None = None
    targets: list[list[TargetBox]] | None = Field(None, description="one list of boxes per image")
    labelled_classes: list[LabelledClasses] | None = Field(
        None, description="with `predictions`: one entry per image (null = every class); "
        f"{LABELLED_CLASSES_DOC}. In the image form give it per image")
    priors: list[Box] | None = Field(None, description="[P][4] (cx, cy, w, h); default: the model's priors")
    images: list[LabelledImage] | None = Field(None, description="the image form: the model predicts")
    options: LossOptions = LossOptions()


class ImageAnnotation(Request):
    boxes: list[Box] = Field(description="(x1, y1, x2, y2) in pixels of the image")
    labels: list[int]
    difficult: list[bool] | None = None
    labelled_classes: LabelledClasses = Field(None, description=f"{LABELLED_CLASSES_DOC} (for /finetune: "
                                              "or the job's `labelled_classes`)")


class LabelledImage(ImageAnnotation):
    image: ImageBase64 = Field(description="base64 PNG or JPEG, optionally as a data URL (data:image/png;base64,...)")


class FinetuneOptions(Request):
    steps: int = Field(1, ge=1)
    learning_rate: float | None = Field(None, gt=0, description="default: SSD_LEARNING_RATE; at most "
                                        "SSD_MAX_LEARNING_RATE (unset: 10 x SSD_LEARNING_RATE)")
    augment: bool = False
    replay: float | None = Field(
        None, ge=0, le=8, description="replayed images per new image in each step; 0: none; default: SSD_REPLAY_RATIO"
    )
    force: bool = Field(False, description="skip screening (the publish gate still applies)")
    labelled_classes: LabelledClasses = Field(
        None, description="the default of every image that gives none itself (an image's own overrides it); "
        f"{LABELLED_CLASSES_DOC}")


class ValidationOptions(Request):
    """`POST /validation` has no options besides its images (the multipart form's fields)."""


class ValidationRequest(ValidationOptions):
    """`POST /validation` as JSON: labelled images for the validation set."""

    images: list[LabelledImage]


class FinetuneRequest(FinetuneOptions):
    images: list[LabelledImage]


class EncodedImage(Request):
    image: ImageBase64 = Field(description="base64 PNG or JPEG, optionally as a data URL (data:image/png;base64,...)")


class DetectOptions(Request):
    score_threshold: float | None = Field(None, ge=0, lt=1, description="default: SSD_SCORE_THRESHOLD")
    max_detections: int | None = Field(None, ge=1, le=10_000, description="default: SSD_MAX_DETECTIONS")
    render: bool = Field(False, description="answer the image (one per request) as a PNG with its boxes, class "
                         "names and scores drawn, instead of JSON")


class DetectRequest(DetectOptions):
    images: list[EncodedImage]


class RollbackRequest(Request):
    version: int = Field(ge=0)


# ---- responses


class ImageLoss(BaseModel):
    loss_l: float
    loss_c: float
    num_ground_truth: int
    num_positives: int
    num_negatives: int
    mean_matched_iou: float
    num_forced_matches: int


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


class ScoreLossResponse(BaseModel):
    loss: float
    loss_l: float
    loss_c: float
    num_positives: int
    num_negatives: int
    per_image: list[ImageLoss]
    per_class: list[ClassLoss] = Field(description="one entry per object class, label order; loss_l sums to "
                                       "loss_l, loss_c plus loss_c_negatives to loss_c")
    loss_c_negatives: float = Field(description="conf loss of the negatives (background) / N")
    model_version: int


class Detection(BaseModel):
    box: list[float] = Field(description="(x1, y1, x2, y2) in pixels of the input image")
    label: int
    class_name: str
    score: float


class DetectResponse(BaseModel):
    detections: list[list[Detection]] = Field(description="one list per input image")
    model_version: int


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


class ModelInfo(BaseModel):
    architecture: str
    num_classes: int
    priors: str = Field(description="prior set: voc or coco (ssd300/ssd512, SSD_PRIORS), scaled (ssd-small)")
    class_names: list[str]
    input_size: int
    num_priors: int
    version: int
    training_steps: int
    device: str
    role: str
    restored_from: int | None = Field(None, description="the saved version a rollback copied")


class VersionInfo(BaseModel):
    version: int
    step: int
    created: str
    pinned: bool = Field(False, description="protected from pruning (POST /model/versions/{version}/pin)")


class VersionsResponse(BaseModel):
    current: int
    versions: list[VersionInfo] = Field(description="saved checkpoints whose files verify (size and sha256), "
                                        "oldest first: the rollback targets")


class PinResponse(BaseModel):
    version: int
    pinned: bool
    pins: list[int] = Field(description="every pinned version")


class ValidationEntry(BaseModel):
    key: str = Field(description="sha256 of the image bytes as sent")
    bytes: int
    boxes: dict[str, int] = Field(description="boxes per class name")


class ValidationView(BaseModel):
    images: int
    bytes: int
    hash: str = Field(description="sha256 over the images and annotations: changes when the set does")
    boxes: dict[str, int] = Field(description="boxes per class name over the whole set")
    max_images: int
    max_bytes: int
    corrupt_dropped: int = Field(description="torn or corrupt entries dropped since the server started")
    entries: list[ValidationEntry]


class ValidationAdded(BaseModel):
    added: int = Field(description="images stored now (already present ones are updated and counted)")
    dropped: int = Field(description="images the bounded set did not keep (reservoir sampling once full)")
    replaced: int = Field(description="entries evicted to make room")
    images: int
    hash: str


class CheckpointResponse(BaseModel):
    version: int
    step: int
    created: str
    saved: bool = Field(description="always true: the version is durable on disk (a failed write is a 503), the "
                        "same meaning as a job's `checkpoint.saved`")
    written: bool = Field(description="true: written by this request; false: this version was already on disk")


class Health(BaseModel):
    status: str
    detail: str | None = None
