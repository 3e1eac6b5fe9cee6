"""`POST /detect`: images (base64 JSON or multipart files) -> scored boxes in image pixels."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

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
from app.api.schemas import Detection, DetectOptions, DetectRequest, DetectResponse
from app.serving.detection import detect_images, render_png

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


@router.post(
    "/detect",
    response_model=DetectResponse,
    responses={**ERROR_RESPONSES, **_PNG_RESPONSE},
    openapi_extra=request_body({JSON: DetectRequest, MULTIPART: MULTIPART_SCHEMA}),
    summary="Detect objects in images with the hosted model",
)
async def detect_objects(
    request: Request, host: HostDep, inference: InferenceDep, settings: SettingsDep, metrics: MetricsDep
) -> DetectResponse | Response:
    """Per image, boxes (x1, y1, x2, y2) in its pixels with label, class name and score, and the
    model version that produced them; with `render=true` the one image as PNG with them drawn."""
    kind = media_type(request.headers.get("content-type"), (JSON, MULTIPART))
    if kind == MULTIPART:
        options, files = await multipart_request(request, DetectOptions, settings, annotated=False)
        encoded = [(data, f"images[{k}]") for k, (data, _) in enumerate(files)]
    else:
        parsed = await run_in_threadpool(parse_json, DetectRequest, await request.body())
        check_image_count(len(parsed.images), settings)
        options = parsed
        encoded = [(item.image, f"images[{k}].image") for k, item in enumerate(parsed.images)]
    if options.render and len(encoded) != 1:
        raise invalid("images", f"render=true draws one image per request, got {len(encoded)}")
    images = await run_in_threadpool(lambda: [decode_image(data, settings, field) for data, field in encoded])
    served = host.current
    found = await detect_images(wait_for_disconnect(request), images, options.score_threshold, options.max_detections,
                                "/detect", served, host, inference, settings)
    metrics.images_processed.labels(route="/detect").inc(len(images))
    if options.render:
        png = await run_in_threadpool(render_png, images[0], found[0], settings)
        return Response(png, media_type="image/png", headers={"X-Model-Version": str(served.version)})
    per_image = [
        [
            Detection(box=box, label=label, class_name=settings.class_name(label), score=score)
            for box, label, score in zip(d.boxes.tolist(), d.labels.tolist(), d.scores.tolist(), strict=True)
        ]
        for d in found
    ]
    return DetectResponse(detections=per_image, model_version=served.version)
