"""`POST /detect`: images (base64 JSON or multipart files) -> scored boxes in image pixels."""

from __future__ import annotations

import torch
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from app.deps import HostDep, MetricsDep, SettingsDep
from app.errors import invalid
from app.inputs import (
    JSON,
    MULTIPART,
    check_image_count,
    decode_image,
    media_type,
    multipart_request,
    parse_json,
)
from app.metrics import Metrics
from app.model_host import ModelHost
from app.openapi import ERROR_RESPONSES, request_body
from app.schemas import Detection, DetectOptions, DetectRequest, DetectResponse
from app.settings import Settings
from ssd_core.drawing import captions, draw_detections
from ssd_core.evaluation import model_inputs
from ssd_core.postprocess import detect

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


def run_detection(
    encoded: list[tuple[bytes, str]], options: DetectOptions, host: ModelHost, settings: Settings, metrics: Metrics
) -> DetectResponse:
    """Decode (bytes, field name) pairs, run the current version, post-process to pixel boxes."""
    images = [decode_image(data, settings, field) for data, field in encoded]  # [3, H_k, W_k] each
    spec = host.spec
    batch = model_inputs(images, spec)  # [B, 3, S, S]
    served = host.current
    loc, conf, priors = host.predict(batch, served)  # [B, P, 4], [B, P, C], [P, 4]
    with torch.inference_mode():
        found = detect(
            loc, conf, priors,
            variances=spec.prior_config.variance,
            score_threshold=settings.score_threshold if options.score_threshold is None else options.score_threshold,
            nms_iou=settings.nms_iou,
            max_detections=options.max_detections or settings.max_detections,
            image_sizes=[(image.shape[1], image.shape[2]) for image in images],
        )
    metrics.images_processed.labels(route="/detect").inc(len(images))
    per_image = [
        [
            Detection(box=box, label=label, class_name=settings.class_name(label), score=score)
            for box, label, score in zip(d.boxes.tolist(), d.labels.tolist(), d.scores.tolist(), strict=True)
        ]
        for d in found
    ]
    return DetectResponse(detections=per_image, model_version=served.version)


@router.post(
    "/detect",
    response_model=DetectResponse,
    responses={**ERROR_RESPONSES, **_PNG_RESPONSE},
    openapi_extra=request_body({JSON: DetectRequest, MULTIPART: MULTIPART_SCHEMA}),
    summary="Detect objects in images with the hosted model",
)
async def detect_objects(
    request: Request, host: HostDep, settings: SettingsDep, metrics: MetricsDep
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
    found = await run_in_threadpool(run_detection, encoded, options, host, settings, metrics)
    if options.render:
        png = await run_in_threadpool(render_png, encoded[0][0], found.detections[0], settings)
        return Response(png, media_type="image/png", headers={"X-Model-Version": str(found.model_version)})
    return found


def render_png(data: bytes, detections: list[Detection], settings: Settings) -> bytes:
    """The image of `data` (decoded again: detection keeps no decoded images) with `detections` drawn."""
    image = decode_image(data, settings, "images[0]")  # [3, H, W]
    boxes = torch.tensor([d.box for d in detections], dtype=torch.float32).reshape(-1, 4)  # [N, 4] pixels
    return draw_detections(image, boxes, captions([d.class_name for d in detections], [d.score for d in detections]))
