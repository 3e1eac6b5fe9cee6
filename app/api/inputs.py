"""Request bodies -> validated inputs. Every problem becomes an `ApiError` naming the field.

Three body kinds reach the routes: JSON (pydantic models in `app.api.schemas`), safetensors
(`application/octet-stream`, `/score-loss` only: `app.api.loss_batch`) and multipart uploads (images as
files, annotations as a JSON field). Here: media types, JSON parsing, labels and boxes, images and the
labelled-image forms (`/finetune`, `/validation`, the image form of `/score-loss`), which all end up as
`Sample`s.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from torch import Tensor
from torchvision.ops import clip_boxes_to_image

from app.api.errors import ApiError, from_validation_error, invalid
from app.api.schemas import ImageAnnotation, LossOptions
from app.core.settings import Settings
from ssd_core.data.datasets import Sample
from ssd_core.data.images import ImageError, decode_image_bytes
from ssd_core.ops.box_formats import check_pixel_boxes

Model = TypeVar("Model", bound=BaseModel)

JSON = "application/json"
BINARY = "application/octet-stream"
MULTIPART = "multipart/form-data"
PIXEL_LIMIT = "pixels exceeds the limit"  # how `decode_image_bytes` words an image over SSD_MAX_IMAGE_PIXELS


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


def check_boxes(
    boxes: Tensor, image_hw: tuple[int, int], field: str, settings: Settings, **rules: float | None
) -> None:
    """422 for too many boxes, or one that is non-finite, inverted/empty, entirely outside the image, or
    (pixel boxes) under 1 px or more than 1 px beyond the image (`rules`: `check_pixel_boxes`'s)."""
    if len(boxes) > settings.max_boxes_per_image:
        raise invalid(field, f"{len(boxes)} boxes exceed the limit of {settings.max_boxes_per_image} "
                      "(SSD_MAX_BOXES_PER_IMAGE)")
    try:
        check_pixel_boxes(boxes, image_hw, name=field, **rules)
    except ValueError as error:
        raise invalid(field, str(error)) from None


# ---- images


def decode_image(data: bytes, settings: Settings, field: str) -> Tensor:
    """Decode PNG/JPEG bytes -> Tensor[3, H, W] uint8; 422 naming `field` when unusable."""
    try:
        return decode_image_bytes(data, settings.max_image_pixels)
    except ImageError as error:
        hint = " (SSD_MAX_IMAGE_PIXELS; or send the image scaled down)" if PIXEL_LIMIT in str(error) else ""
        raise ApiError(422, "invalid_image", f"{field}: {error}{hint}", field) from None


def check_image_count(count: int, settings: Settings, field: str = "images") -> None:
    if count == 0:
        raise invalid(field, "the batch is empty")
    if count > settings.max_images_per_request:
        raise invalid(field, f"{count} images exceed the limit of {settings.max_images_per_request} "
                      "(SSD_MAX_IMAGES_PER_REQUEST); send them in several requests")


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
        check_boxes(boxes, (image.shape[1], image.shape[2]), f"{note_field}.boxes", settings)
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
