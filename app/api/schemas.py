"""Request and response bodies (pydantic). Boxes are (x1, y1, x2, y2); labels are 0-based object
classes not counting background. Non-finite numbers are rejected at parse time, naming the field."""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from typing import Annotated, Literal

from annotated_types import Len
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from app.online.job_view import ClassLoss, JobView

Box = Annotated[list[float], Len(4, 4)]  # (x1, y1, x2, y2)
_DATA_URL = re.compile(r"data:[^,]*;base64,", re.IGNORECASE)


def _strip_data_url(value: object) -> object:
    """`data:image/png;base64,iVBOR...` (what browsers and canvas.toDataURL produce) -> `iVBOR...`."""
    if isinstance(value, str) and (match := _DATA_URL.match(value)):
        return value[match.end():]
    return value


# characters of file names, paths and URLs that base64 never holds (its `/` and `+` start JPEG's: `/9j/`)
_NOT_BASE64 = re.compile(r"[.:~\\]")
BASE64_HOW = "send the file's bytes as base64 (`base64 -w0 photo.jpg`) or as a data URL (data:image/png;base64,...)"


def _decode_base64_image(value: object) -> object:
    """base64 text (a data URL prefix allowed, line breaks ignored) -> bytes; a file name, path or URL gets
    an error saying how to send the image instead of the decoder's "Incorrect padding"."""
    if isinstance(value, bytes):  # base64 as bytes, as pydantic's Base64Bytes takes it
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return value  # fails the `bytes` type below
    value = str(_strip_data_url(value))
    with contextlib.suppress(binascii.Error, ValueError):
        # plain padded base64, what clients send: one C pass; strict mode admits no character the checks below
        # look for, so only text it refuses pays for them (about 0.35 ms per 100 KB)
        return binascii.a2b_base64(value, strict_mode=True)
    text = "".join(value.split())
    if _NOT_BASE64.search(text):
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise PydanticCustomError(
            "base64_image",
            "'{shown}' looks like a file name, path or URL, not an image: the service reads no files and fetches "
            "no URLs; {how}, or upload the file as multipart (curl -F images=@photo.jpg)",
            {"shown": shown, "how": BASE64_HOW},
        )
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)  # url-safe too
    except (binascii.Error, ValueError) as error:  # ValueError: a character beyond ASCII
        raise PydanticCustomError(
            "base64_image", "not valid base64 ({reason}); {how}", {"reason": str(error), "how": BASE64_HOW}
        ) from None


# base64 image bytes, with or without a data URL prefix (the decoder tells PNG from JPEG by content)
ImageBase64 = Annotated[
    bytes, BeforeValidator(_decode_base64_image), WithJsonSchema({"type": "string", "format": "base64"})
]


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
    force: bool = Field(False, description="train quarantined images and a batch screening would reject (they still enter no store; the publish gate still judges)")
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
    backend: str = Field(description="what serves this version's forward passes: onnxruntime or torch (SSD_BACKEND; "
                         "torch also while a new version's ONNX Runtime session is being built, and for a version it "
                         "could not build)")
    role: str
    restored_from: int | None = Field(None, description="the saved version a rollback copied")


class VersionInfo(BaseModel):
    version: int
    step: int
    created: str
    pinned: bool = Field(False, description="protected from pruning (POST /model/versions/{version}/pin)")


class LostVersions(BaseModel):
    first: int
    last: int


class VersionsResponse(BaseModel):
    current: int
    versions: list[VersionInfo] = Field(description="saved checkpoints whose files verify (size and sha256), "
                                        "oldest first: the rollback targets")
    lost: list[LostVersions] = Field(
        default_factory=list, description="version numbers handed out (and possibly served) before a crash that "
        "no checkpoint holds, as inclusive ranges, oldest first: their weights are gone, and the numbers are "
        "never handed out again")


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


# ---- Label Studio's ML backend protocol (/labelstudio; docs/LABEL_STUDIO.md). Label Studio sends more keys than
# these (hostname, access_token, params, ...): they are accepted and not used.


class LabelStudioSetup(BaseModel):
    project: str | int | None = Field(None, description="Label Studio's `<project id>.<created timestamp>`")
    schema_: str = Field(alias="schema", description="the project's label config (XML)")


class LabelStudioPredictRequest(BaseModel):
    tasks: list[dict] = Field(description="Label Studio tasks: `id`, `data` with the image URL")
    label_config: str = Field(description="the project's label config (XML)")
    project: str | int | None = None


class LabelStudioPrediction(BaseModel):
    result: list[dict] = Field(description="rectangle results: value x, y, width, height in percent of the image")
    score: float = Field(description="mean confidence of the boxes (0 without any): sort ascending to label the "
                         "least certain tasks first")
    model_version: str


class LabelStudioPredictions(BaseModel):
    results: list[LabelStudioPrediction] = Field(description="one per task, in the request's order")


class LabelStudioModelVersion(BaseModel):
    model_version: str


class LabelStudioHealth(BaseModel):
    status: Literal["UP"]
    model_class: str
    model_version: str


class LabelStudioVersions(BaseModel):
    versions: list[str] = Field(description="the served version and the saved ones, newest first")


class LabelStudioWebhook(BaseModel):
    """A Label Studio webhook: `action` and the objects it names (`annotation`, `task`, `project`); only the ids
    are read, everything else is fetched from Label Studio."""

    model_config = ConfigDict(extra="allow")
    action: str


class LabelStudioWebhookAnswer(BaseModel):
    status: Literal["queued", "ignored"] = Field(
        description="queued: the annotation or project is fetched from Label Studio and trained on in the "
        "background; ignored: an action the backend does not act on")


class JobList(BaseModel):
    jobs: list[JobView] = Field(description="newest first")
    total: int = Field(description="jobs matching the filters")
    offset: int
    limit: int
