"""Request bodies -> validated tensors. Every problem becomes an `ApiError` naming the field.

Three body kinds reach the routes: JSON (pydantic models in `app.schemas`), safetensors
(`application/octet-stream`, `/score-loss` only) and multipart uploads (images as files,
annotations as a JSON field). They all end up as the same tensors / `Sample`s.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from torch import Tensor
from torchvision.ops import clip_boxes_to_image

from app.errors import ApiError, from_validation_error, invalid
from app.schemas import ImageAnnotation, LossOptions, ScoreLossRequest
from app.settings import Settings
from ssd_core.box_formats import check_pixel_boxes
from ssd_core.datasets import Sample
from ssd_core.images import ImageError, decode_image_bytes
from ssd_core.partial_labels import labelled_class_mask

Model = TypeVar("Model", bound=BaseModel)

JSON = "application/json"
BINARY = "application/octet-stream"
MULTIPART = "multipart/form-data"


def media_type(content_type: str | None, accepted: Sequence[str]) -> str:
    """The request's media type if accepted (a missing Content-Type counts as JSON), else 415."""
    kind = (content_type or JSON).split(";")[0].strip().lower()
    if kind not in accepted:
        raise ApiError(
            415, "unsupported_media_type", f"Content-Type {kind!r} is not one of {', '.join(accepted)}",
            "Content-Type",
        )
    return kind


def parse_json(model: type[Model], body: bytes) -> Model:
    """Validate a JSON body against `model` (400 for invalid JSON, 422 naming the field)."""
    if not body.strip():
        raise ApiError(400, "invalid_json", "body is empty; expected a JSON object", "body")
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise from_validation_error(error.errors()) from None


def check_bkg_label(options: LossOptions, settings: Settings) -> None:
    """The one option bound that depends on the hosted model: bkg_label < num_classes (422 naming it)."""
    if options.bkg_label >= settings.num_classes:
        raise invalid("options.bkg_label", f"must be < num_classes={settings.num_classes}")


def validate_as(adapter: TypeAdapter, value: object, field: str):
    """Validate a Python value (e.g. a multipart field) with `adapter`, naming errors under `field`."""
    try:
        return adapter.validate_python(value)
    except ValidationError as error:
        raise from_validation_error(error.errors(), prefix=field) from None


# ---- predictions form of /score-loss


@dataclass
class LossBatch:
    """What the loss is computed on.

    Attributes:
        loc (Tensor[B, P, 4]), conf (Tensor[B, P, C]), priors (Tensor[P, 4]) cxcywh, targets (Tensor[B, M, 6])
        padded, normalised (x1, y1, x2, y2, label, difficult), label < 0 = padding; options for the loss;
        class_mask (Tensor[B, C] bool) of partial labels or None.
    """

    loc: Tensor
    conf: Tensor
    priors: Tensor
    targets: Tensor
    options: LossOptions
    class_mask: Tensor | None = None


def _tensor(values: list, field: str, expected: str) -> Tensor:
    try:
        return torch.tensor(values, dtype=torch.float32)
    except (ValueError, TypeError) as error:  # ragged nesting
        raise invalid(field, f"must be a rectangular {expected} array ({error})") from None


def predictions_batch(request: ScoreLossRequest, model_priors: Tensor, settings: Settings) -> LossBatch:
    """The JSON prediction form -> LossBatch, checked against the model's priors and classes."""
    assert request.predictions is not None and request.targets is not None  # the schema's form check
    loc = request.predictions.loc
    if not loc:
        raise invalid("predictions.loc", "the batch is empty")
    for b, rows in enumerate(loc):
        if len(rows) != len(loc[0]):
            raise invalid(f"predictions.loc[{b}]", f"has {len(rows)} priors, predictions.loc[0] has {len(loc[0])}")
    targets = []
    for b, boxes in enumerate(request.targets):
        for i, t in enumerate(boxes):  # before the tensor: an int past float range must be a 422, not a 500
            check_label(t.label, settings.num_classes, f"targets[{b}][{i}].label")
        rows = [[*t.box, t.label, float(t.difficult)] for t in boxes]
        targets.append(torch.tensor(rows, dtype=torch.float32).reshape(-1, 6))  # [n_b, 6]
    priors = None if request.priors is None else _tensor(request.priors, "priors", "[P][4]")
    padded = _pad(targets)
    batch = check_batch(
        _tensor(loc, "predictions.loc", "[B][P][4]"),
        _tensor(request.predictions.conf, "predictions.conf", "[B][P][C]"),
        priors, padded, request.options, model_priors, settings, "predictions.",
    )
    batch.class_mask = batch_class_mask(request.labelled_classes, padded, request.options, settings,
                                        "labelled_classes", lambda b, i: f"targets[{b}][{i}].label")
    return batch


def _pad(targets: list[Tensor]) -> Tensor:
    """[n_b, 6] per image -> Tensor[B, M, 6], padding rows label -1 (M >= 1)."""
    batch = torch.full((len(targets), max([1, *(len(t) for t in targets)]), 6), -1.0)
    for b, rows in enumerate(targets):
        batch[b, : len(rows)] = rows
    return batch


def check_label(label: float, num_classes: int, field: str) -> None:
    if not (label == int(label) and 0 <= label <= num_classes - 2):
        raise invalid(field, f"label {label} is not an object class in [0, {num_classes - 2}] (background excluded)")


def check_labelled_classes(
    declared: Sequence[int] | None, labels: Sequence[float], num_classes: int, field: str,
    box_field: Callable[[int], str],
) -> tuple[int, ...] | None:
    """An image's partial labels, checked: 422 naming `field[j]` for a declared label outside the object
    classes, or `box_field(i)` for a box whose label is not declared. Returns them sorted, deduplicated."""
    if declared is None:
        return None
    for j, label in enumerate(declared):
        check_label(label, num_classes, f"{field}[{j}]")
    for i, label in enumerate(labels):
        if label not in declared:
            raise invalid(box_field(i), f"label {int(label)} is not among the image's labelled_classes "
                          f"{sorted(set(declared))}")
    return tuple(sorted(set(declared)))


def batch_class_mask(
    labelled: Sequence[Sequence[int] | None] | None, targets: Tensor, options: LossOptions, settings: Settings,
    field: str, box_field: Callable[[int, int], str],
) -> Tensor | None:
    """Per-image partial labels of a predictions batch -> the loss's class mask [B, C] (None: nothing declared).

    Args:
        targets (Tensor[B, M, 6]): padded; box i of image b is row i (padding rows skipped).
        field: where the list lives (422 names `field`, `field[b][j]`); box_field(b, i): a box's label.
    """
    if labelled is None:
        return None
    if len(labelled) != len(targets):
        raise invalid(field, f"has {len(labelled)} entries for {len(targets)} images")
    for b, declared in enumerate(labelled):
        rows = (targets[b, :, 4] >= 0).nonzero().flatten().tolist()  # real boxes of image b
        labels = targets[b, rows, 4].tolist()
        check_labelled_classes(declared, labels, settings.num_classes, f"{field}[{b}]",
                               lambda k, b=b, rows=rows: box_field(b, rows[k]))
    return labelled_class_mask(labelled, settings.num_classes, options.bkg_label)


def check_batch(
    loc: Tensor, conf: Tensor, priors: Tensor | None, targets: Tensor, options: LossOptions,
    model_priors: Tensor, settings: Settings, prefix: str,
) -> LossBatch:
    """Shapes, finiteness, classes and boxes of a loss batch; `prefix` is where loc/conf live."""
    if loc.dim() != 3 or loc.shape[-1] != 4:
        raise invalid(f"{prefix}loc", f"must be [B][P][4], got shape {list(loc.shape)}")
    batch, num_priors = loc.shape[:2]
    if batch == 0:
        raise invalid(f"{prefix}loc", "the batch is empty")
    if batch > settings.max_images_per_request:
        raise invalid(f"{prefix}loc", f"batch of {batch} exceeds the limit of {settings.max_images_per_request}")
    if conf.dim() != 3 or conf.shape[:2] != loc.shape[:2]:
        raise invalid(f"{prefix}conf", f"must be [B={batch}][P={num_priors}][C], got shape {list(conf.shape)}")
    if conf.shape[-1] != settings.num_classes:
        raise invalid(f"{prefix}conf", f"has {conf.shape[-1]} classes, the model has num_classes={settings.num_classes}")
    priors_field = "priors" if priors is not None else f"{prefix}loc"
    priors = model_priors.cpu() if priors is None else priors
    if priors.dim() != 2 or priors.shape != (num_priors, 4):
        raise invalid(priors_field, f"P={num_priors} predictions do not match priors of shape {list(priors.shape)}")
    if not (priors[:, 2:] > 0).all():
        raise invalid("priors", "every prior needs a positive width and height")
    for name, tensor in (("loc", loc), ("conf", conf), ("priors", priors)):
        index = _first_non_finite(tensor)
        if index is not None:
            raise invalid(name if name == "priors" else f"{prefix}{name}", f"holds a non-finite number at {index}")
    if targets.shape[0] != batch:
        raise invalid("targets", f"has {targets.shape[0]} images, the predictions have B={batch}")
    check_bkg_label(options, settings)
    real = targets[..., 4] >= 0  # [B, M]
    try:  # one check of all real boxes; per image only to name the failing one
        if int(real.sum(dim=1).max()) > settings.max_boxes_per_image:
            raise ValueError("too many boxes")
        check_pixel_boxes(targets[real][:, :4], (1, 1), **_NORMALISED)
    except ValueError as error:
        for b in range(batch):
            _check_boxes(targets[b][real[b]][:, :4], (1, 1), f"targets[{b}]", settings, **_NORMALISED)  # [n_b, 4]
        raise invalid("targets", str(error)) from None
    return LossBatch(loc, conf, priors, targets, options)


def _first_non_finite(tensor: Tensor) -> list[int] | None:
    """Index of the first NaN/inf element, or None. The sum is a cheap test: it is finite when every
    element is (an overflowing sum of finite values falls through to the exact check)."""
    if torch.isfinite(tensor.sum()):
        return None
    bad = (~torch.isfinite(tensor)).nonzero()
    return [int(i) for i in bad[0]] if len(bad) else None


_NORMALISED = {"min_size": 0.0, "tolerance": None}  # boxes in [0, 1]: no pixel size or overhang rule


def _check_boxes(
    boxes: Tensor, image_hw: tuple[int, int], field: str, settings: Settings, **rules: float | None
) -> None:
    """422 for too many boxes, or one that is non-finite, inverted/empty, entirely outside the image, or
    (pixel boxes) under 1 px or more than 1 px beyond the image (`rules`: `check_pixel_boxes`'s)."""
    if len(boxes) > settings.max_boxes_per_image:
        raise invalid(field, f"{len(boxes)} boxes exceed the limit of {settings.max_boxes_per_image}")
    try:
        check_pixel_boxes(boxes, image_hw, name=field, **rules)
    except ValueError as error:
        raise invalid(field, str(error)) from None


# ---- safetensors form of /score-loss

_TENSORS = {"loc", "conf", "targets", "priors"}
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


async def read_body(request: Request) -> bytearray:
    """The request body in one writable buffer: one copy of the received chunks (into a buffer sized by
    Content-Length when given), so tensors can be views of it (`torch.frombuffer` wants it writable)."""
    declared = request.headers.get("content-length")
    body = bytearray(int(declared)) if declared and declared.isdigit() else bytearray()
    size = 0
    async for chunk in request.stream():
        end = size + len(chunk)
        if end <= len(body):
            body[size:end] = chunk
        else:
            body[size:] = chunk
        size = end
    del body[size:]
    return body


def safetensors_batch(body: bytes | bytearray, model_priors: Tensor, settings: Settings) -> LossBatch:
    """A safetensors body (loc, conf, targets [B, M, 5|6] padded, optional priors; options as JSON
    strings in `__metadata__`) -> LossBatch. The header is checked before any tensor is built; float32
    tensors of a bytearray body are views of it, not copies."""
    header = _safetensors_header(body)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if name not in _TENSORS:
            raise invalid(name, f"unknown tensor; expected {sorted(_TENSORS)}")
        if not isinstance(entry, dict) or entry.get("dtype") not in _FLOAT_DTYPES:
            raise invalid(name, f"dtype must be one of {sorted(_FLOAT_DTYPES)}")
    for name in ("loc", "conf", "targets"):
        if name not in header:
            raise invalid(name, "missing tensor")
    tensors = _safetensors_views(body, header)
    metadata, labelled = header.get("__metadata__") or {}, None
    if isinstance(metadata, dict) and "labelled_classes" in metadata:
        metadata = {key: text for key, text in metadata.items() if key != "labelled_classes"}
        labelled = _metadata_labelled_classes(header["__metadata__"]["labelled_classes"])
    return tensor_batch(tensors, _metadata_options(metadata), model_priors, settings, labelled,
                        "__metadata__.labelled_classes")


def tensor_batch(
    tensors: dict[str, Tensor], options: LossOptions, model_priors: Tensor, settings: Settings,
    labelled: Sequence[Sequence[int] | None] | None = None, labelled_field: str = "labelled_classes",
) -> LossBatch:
    """Named tensors (the safetensors body, the protocol's `ssd-loss` inputs) -> LossBatch.

    Args:
        tensors: `loc` [B, P, 4], `conf` [B, P, C], `targets` [B, M, 5|6] padded (normalised x1, y1, x2, y2,
            label, optional difficult; label < 0 pads), optional `priors` [P, 4] (cx, cy, w, h).
        labelled: per image, its partial labels (0-based object classes) or None; errors name `labelled_field`.
    """
    targets = tensors["targets"].float()
    if targets.dim() != 3 or targets.shape[-1] not in (5, 6):
        raise invalid("targets", f"must be padded [B, M, 5|6], got shape {list(targets.shape)}")
    if targets.shape[-1] == 5:
        targets = torch.cat((targets, targets.new_zeros((*targets.shape[:2], 1))), dim=-1)  # [B, M, 6]
    if not torch.isfinite(targets).all():
        raise invalid("targets", "holds a non-finite number")
    real = targets[..., 4] >= 0  # [B, M]
    labels = targets[..., 4][real]  # [N]
    if ((labels != labels.round()) | (labels > settings.num_classes - 2)).any():  # name the first one
        for b, i in real.nonzero().tolist():
            check_label(float(targets[b, i, 4]), settings.num_classes, f"targets[{b}][{i}]")
    priors = tensors.get("priors")
    batch = check_batch(
        tensors["loc"].float(), tensors["conf"].float(), None if priors is None else priors.float(),
        targets, options, model_priors, settings, "",
    )
    batch.class_mask = batch_class_mask(labelled, targets, options, settings, labelled_field,
                                        lambda b, i: f"targets[{b}][{i}]")
    return batch


def _bad_safetensors(message: str) -> ApiError:
    return ApiError(400, "invalid_safetensors", f"body is not valid safetensors: {message}", "body")


def _safetensors_views(body: bytes | bytearray, header: dict) -> dict[str, Tensor]:
    """The header's tensors (float dtypes, already checked) over the body's bytes, after the checks of
    safetensors' own loader: every shape's byte size equals its offsets' span, and the spans tile the
    data section in order, from 0 to its end. Views of a bytearray body, copies of a bytes one."""
    data_start = 8 + int.from_bytes(body[:8], "little")
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    for name, entry in entries.items():
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _bad_safetensors(f"{name}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise _bad_safetensors(f"{name}: data_offsets must be two integers, got {offsets!r}")
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"]):
        start, end = entry["data_offsets"]
        if start != position or end < start:
            raise _bad_safetensors(f"{name}: data_offsets {[start, end]} leave a gap or overlap at byte {position}")
        size = math.prod(entry["shape"]) * _FLOAT_DTYPES[entry["dtype"]].itemsize
        if size != end - start:
            raise _bad_safetensors(f"{name}: shape {entry['shape']} needs {size} bytes, data_offsets give {end - start}")
        position = end
    if data_start + position != len(body):
        raise _bad_safetensors(f"the tensors cover {position} bytes, the data section holds {len(body) - data_start}")
    if isinstance(body, bytes):
        body = bytearray(body)  # torch.frombuffer needs a writable buffer
    buffer = torch.frombuffer(body, dtype=torch.uint8)  # [len(body)], not empty: the header was read
    tensors = {}
    for name, entry in entries.items():
        dtype = _FLOAT_DTYPES[entry["dtype"]]
        start, end = (data_start + offset for offset in entry["data_offsets"])
        raw = buffer[start:end]
        if start % dtype.itemsize:  # a header length that is not a multiple of 8: realign by copying
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(entry["shape"])
    return tensors


def _safetensors_header(body: bytes | bytearray) -> dict:
    bad = _bad_safetensors
    if len(body) < 8:
        raise bad("shorter than its 8-byte header length")
    length = int.from_bytes(body[:8], "little")
    if length > len(body) - 8:
        raise bad(f"header length {length} exceeds the {len(body) - 8} bytes that follow")
    try:
        header = json.loads(body[8 : 8 + length])
    except (ValueError, RecursionError) as error:  # RecursionError: nesting deeper than Python's stack
        raise bad(f"header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    return header


_OPTIONS = TypeAdapter(LossOptions)
_LABELLED_PER_IMAGE = TypeAdapter(list[list[int] | None])


def _metadata_labelled_classes(text: object) -> list[list[int] | None]:
    """`__metadata__["labelled_classes"]`: a JSON string of one list (or null) per image."""
    field = "__metadata__.labelled_classes"
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except (ValueError, RecursionError):
        raise invalid(field, "must be a JSON string of one list of labels (or null) per image") from None
    return validate_as(_LABELLED_PER_IMAGE, value, field)


def _metadata_options(metadata: dict) -> LossOptions:
    """`__metadata__` {option: JSON string} -> LossOptions (a bare string, e.g. bipartite, is itself)."""
    if not isinstance(metadata, dict):
        raise invalid("__metadata__", "must be a JSON object of strings")
    options = {}
    for key, text in metadata.items():
        try:
            options[key] = json.loads(text)
        except (TypeError, ValueError, RecursionError):
            options[key] = text
    return validate_as(_OPTIONS, options, "__metadata__")


# ---- images


def decode_image(data: bytes, settings: Settings, field: str) -> Tensor:
    """Decode PNG/JPEG bytes -> Tensor[3, H, W] uint8; 422 naming `field` when unusable."""
    try:
        return decode_image_bytes(data, settings.max_image_pixels)
    except ImageError as error:
        raise ApiError(422, "invalid_image", f"{field}: {error}", field) from None


def check_image_count(count: int, settings: Settings, field: str = "images") -> None:
    if count == 0:
        raise invalid(field, "the batch is empty")
    if count > settings.max_images_per_request:
        raise invalid(field, f"{count} images exceed the limit of {settings.max_images_per_request}")


def labelled_samples(
    items: Sequence[tuple[bytes, ImageAnnotation]], settings: Settings, multipart: bool = False,
    labelled_classes: Sequence[int] | None = None,
) -> list[Sample]:
    """Images with pixel boxes -> `Sample`s (boxes (x1, y1, x2, y2) in pixels, clipped to the image,
    labels 0-based). The one path every labelled-image input takes (/score-loss, /finetune, ...).

    Refused (422 naming the image and box, with a hint): boxes under 1 px wide or high (normalised
    coordinates sent as pixels), boxes more than 1 px beyond their image (within 1 px they are clipped),
    and a batch in which no image holds a box (background-only images beside annotated ones are fine).

    `labelled_classes` (a job's partial labels) is the default of every image that declares none.
    Errors name `images[k].image` / `images[k].boxes` for JSON bodies and `images[k]` /
    `annotations[k].boxes` for multipart uploads.
    """
    check_image_count(len(items), settings)
    if labelled_classes is not None:
        check_labelled_classes(labelled_classes, [], settings.num_classes, "labelled_classes", str)
    samples = []
    for k, (data, note) in enumerate(items):
        image_field, note_field = (f"images[{k}]", f"annotations[{k}]") if multipart else (
            f"images[{k}].image", f"images[{k}]")
        if len(note.labels) != len(note.boxes):
            raise invalid(f"{note_field}.labels", f"has {len(note.labels)} labels for {len(note.boxes)} boxes")
        if note.difficult is not None and len(note.difficult) != len(note.boxes):
            raise invalid(f"{note_field}.difficult", f"has {len(note.difficult)} flags for {len(note.boxes)} boxes")
        for i, label in enumerate(note.labels):
            check_label(label, settings.num_classes, f"{note_field}.labels[{i}]")
        own = note.labelled_classes is not None
        declared = check_labelled_classes(
            note.labelled_classes if own else labelled_classes, note.labels, settings.num_classes,
            f"{note_field}.labelled_classes" if own else "labelled_classes",
            lambda i, field=note_field: f"{field}.labels[{i}]",
        )
        image = decode_image(data, settings, image_field)  # [3, H, W]
        boxes = torch.tensor(note.boxes, dtype=torch.float32).reshape(-1, 4)  # [N, 4] pixel xyxy
        _check_boxes(boxes, (image.shape[1], image.shape[2]), f"{note_field}.boxes", settings)
        boxes = clip_boxes_to_image(boxes, (image.shape[1], image.shape[2]))  # the <= 1 px overhang
        difficult = note.difficult or [False] * len(note.boxes)
        labels = torch.tensor(note.labels, dtype=torch.long).reshape(-1)  # [N]
        samples.append(Sample(image, boxes, labels, torch.tensor(difficult, dtype=torch.bool).reshape(-1), declared))
    if not any(len(sample.boxes) for sample in samples):
        raise invalid("images", f"none of the {len(samples)} images holds a box: there is nothing to learn or "
                      "score; background-only images are welcome beside annotated ones")
    return samples


_ANNOTATIONS = TypeAdapter(list[ImageAnnotation])


async def labelled_request(
    request: Request, options: type[BaseModel], body: type[BaseModel], settings: Settings
) -> tuple[BaseModel, list[tuple[bytes, ImageAnnotation]], list[Sample]]:
    """A labelled-image request (`/finetune`, `/validation`) as JSON (`body`, with `images`) or multipart
    (`options`' fields, files `images`, JSON field `annotations`): (its options, (image bytes as sent,
    annotation) per image, the decoded `Sample`s)."""
    kind = media_type(request.headers.get("content-type"), (JSON, MULTIPART))
    if kind == MULTIPART:
        parsed, items = await multipart_request(request, options, settings, annotated=True)
    else:
        parsed = await run_in_threadpool(parse_json, body, await request.body())
        items = [(item.image, item) for item in parsed.images]
    default_classes = getattr(parsed, "labelled_classes", None)  # a job's partial labels (/finetune)
    samples = await run_in_threadpool(labelled_samples, items, settings, kind == MULTIPART, default_classes)
    return parsed, items, samples


async def multipart_request(
    request: Request, options: type[BaseModel], settings: Settings, annotated: bool
) -> tuple[BaseModel, list[tuple[bytes, ImageAnnotation | None]]]:
    """A multipart image request: its option fields validated as `options` (errors name the field)
    and its image files, with their annotations when `annotated`."""
    form = await request.form()
    expected = ["images", *(["annotations"] if annotated else []), *options.model_fields]
    unknown = [name for name in dict.fromkeys(form.keys()) if name not in expected]
    if unknown and "images" in form:  # a missing `images` is named below, with the fields that arrived
        raise invalid(unknown[0], f"unknown multipart field; expected {', '.join(expected)}")
    fields = {name: _form_field(name, form[name]) for name in options.model_fields if name in form}
    return validate_as(_adapter(options), fields, ""), await multipart_images(form, settings, annotated)


_JSON_FORM_FIELDS = {"labelled_classes"}  # multipart option fields that hold JSON (a list)


def _form_field(name: str, value: object) -> object:
    if name in _JSON_FORM_FIELDS and isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            raise ApiError(400, "invalid_json", f"{name} is not valid JSON", name) from None
    return value


@functools.cache
def _adapter(model: type[BaseModel]) -> TypeAdapter:
    return TypeAdapter(model)


async def multipart_images(form: FormData, settings: Settings, annotated: bool) -> list[tuple[bytes, ImageAnnotation | None]]:
    """Files of the `images` field, with the `annotations` JSON field (one entry per file) when `annotated`."""
    files = form.getlist("images")
    if not files:
        arrived = ", ".join(f"{name} ({'file' if isinstance(form[name], UploadFile) else 'text'})"
                            for name in dict.fromkeys(form.keys())) or "none"
        raise invalid("images", f"no `images` part: send each image as a file field named images "
                      f"(curl -F images=@photo.jpg); the fields that arrived: {arrived}")
    if any(not isinstance(f, UploadFile) for f in files):
        raise invalid("images", "every `images` part must be a file upload")
    check_image_count(len(files), settings)
    notes: list[ImageAnnotation | None] = [None] * len(files)
    if annotated:
        raw = form.get("annotations")
        if not isinstance(raw, str):
            raise invalid("annotations", "missing JSON field: one {boxes, labels} object per image")
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError) as error:  # RecursionError: nesting deeper than Python's stack
            raise ApiError(400, "invalid_json", f"annotations is not valid JSON: {error}", "annotations") from None
        notes = validate_as(_ANNOTATIONS, value, "annotations")
        if len(notes) != len(files):
            raise invalid("annotations", f"has {len(notes)} entries for {len(files)} images")
    return [(await f.read(), note) for f, note in zip(files, notes, strict=True)]
