"""`POST /detect`: images (base64 JSON or multipart files) -> scored boxes in image pixels.

The request path is kept short: one worker-thread hop parses, decodes and prepares the images (resized and
normalised) and queues them, the inference thread runs the forward pass and the detections of the whole batch,
and the answer is encoded with orjson straight from the detection tensors' lists (the response model documents
it; pydantic would validate every box again).
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from app.api.deps import HostDep, InferenceDep, MetricsDep, SettingsDep
from app.api.disconnect import wait_for_disconnect
from app.api.errors import invalid
from app.api.inputs import (
    JSON,
    MULTIPART,
    check_image_count,
    decode_image,
    media_type,
    multipart_request,
    parse_json,
)
from app.api.openapi import ERROR_RESPONSES, request_body
from app.api.schemas import DetectOptions, DetectRequest, DetectResponse
from app.core.settings import Settings
from app.serving.detection import prepare_images, queue_detection, render_png
from app.serving.inference import InferenceWorker, Queued, queued_detections
from app.serving.model_host import ModelHost, ModelVersion
from ssd_core.models.base import ModelSpec
from ssd_core.models.postprocess import Detections

router = APIRouter(tags=["detect"])

MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "PNG/JPEG files"},
        "score_threshold": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "max_detections": {"type": "integer", "minimum": 1, "maximum": 10_000},
        "render": {"type": "boolean", "default": False, "description": "answer a PNG with the detections drawn"},
    },
}
_PNG_RESPONSE = {200: {"content": {"image/png": {}}, "description": "JSON detections, or with render=true "
                       "the image as PNG with its detections drawn (header X-Model-Version)"}}


def prepared(
    encoded: Sequence[tuple[bytes, str]], options: DetectOptions, settings: Settings, spec: ModelSpec
) -> tuple[list[Tensor], Tensor, list[tuple[int, int]]]:
    """Encoded images (bytes, field named in errors) -> (decoded images, model batch, sizes): the request's
    one worker-thread hop."""
    if options.render and len(encoded) != 1:
        raise invalid("images", f"render=true draws one image per request, got {len(encoded)}")
    images = [decode_image(data, settings, field) for data, field in encoded]
    return images, *prepare_images(images, spec)


def queued(
    encoded: Sequence[tuple[bytes, str]], options: DetectOptions, settings: Settings, host: ModelHost,
    inference: InferenceWorker,
) -> tuple[list[Tensor], ModelVersion, Queued]:
    """`prepared`, then the batch queued for the version served now (decoded images, that version, the queued
    parts): still in the worker thread, so the forward pass can start before the event loop sees the hop end."""
    images, batch, sizes = prepared(encoded, options, settings, host.spec)
    served = host.current
    parts = queue_detection(batch, sizes, options.score_threshold, options.max_detections, "/detect", served,
                            inference, settings)
    return images, served, parts


def json_request(
    body: bytes, settings: Settings, host: ModelHost, inference: InferenceWorker
) -> tuple[DetectOptions, list[Tensor], ModelVersion, Queued]:
    parsed = parse_json(DetectRequest, body)
    check_image_count(len(parsed.images), settings)
    encoded = [(item.image, f"images[{k}].image") for k, item in enumerate(parsed.images)]
    return parsed, *queued(encoded, parsed, settings, host, inference)


def detections_json(found: list[Detections], version: int, settings: Settings) -> bytes:
    """The `DetectResponse` body."""
    names = settings.class_name
    per_image = [
        [
            {"box": box, "label": label, "class_name": names(label), "score": score}
            for box, label, score in zip(d.boxes.tolist(), d.labels.tolist(), d.scores.tolist(), strict=True)
        ]
        for d in found
    ]
    return orjson.dumps({"detections": per_image, "model_version": version})


@router.post(
    "/detect",
    response_model=DetectResponse,
    responses={**ERROR_RESPONSES, **_PNG_RESPONSE},
    openapi_extra=request_body({JSON: DetectRequest, MULTIPART: MULTIPART_SCHEMA}),
    summary="Detect objects in images with the hosted model",
)
async def detect_objects(
    request: Request, host: HostDep, inference: InferenceDep, settings: SettingsDep, metrics: MetricsDep
) -> Response:
    """Per image, boxes (x1, y1, x2, y2) in its pixels with label, class name and score, and the
    model version that produced them; with `render=true` the one image as PNG with them drawn."""
    kind = media_type(request.headers.get("content-type"), (JSON, MULTIPART))
    if kind == MULTIPART:
        options, files = await multipart_request(request, DetectOptions, settings, annotated=False)
        encoded = [(data, f"images[{k}]") for k, (data, _) in enumerate(files)]
        images, served, parts = await run_in_threadpool(queued, encoded, options, settings, host, inference)
    else:
        options, images, served, parts = await run_in_threadpool(json_request, await request.body(), settings, host,
                                                                 inference)
    found = await queued_detections(wait_for_disconnect(request), inference, parts)
    metrics.images_processed.labels(route="/detect").inc(len(images))
    if options.render:
        png = await run_in_threadpool(render_png, images[0], found[0], settings)
        return Response(png, media_type="image/png", headers={"X-Model-Version": str(served.version)})
    return Response(detections_json(found, served.version, settings), media_type="application/json")
