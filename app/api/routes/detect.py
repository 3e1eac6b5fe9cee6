"""`POST /detect`: images (base64 JSON or multipart files) -> scored boxes in image pixels."""

from __future__ import annotations

import torch
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from app.api.deps import HostDep, InferenceDep, MetricsDep, SettingsDep
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
from app.core.settings import Settings
from app.serving.inference import InferenceWorker, forward
from app.serving.model_host import ModelHost, ModelVersion
from ssd_core.data.images import model_inputs
from ssd_core.evaluation.drawing import captions, draw_detections
from ssd_core.models.postprocess import Detections, detect

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


def detection_options(options: DetectOptions, settings: Settings) -> tuple[float, int]:
    """(score_threshold, max_detections) of a request, the settings' defaults where unset."""
    threshold = settings.score_threshold if options.score_threshold is None else options.score_threshold
    return threshold, options.max_detections or settings.max_detections


async def detect_images(
    request: Request, images: list[Tensor], options: DetectOptions, route: str, served: ModelVersion,
    host: ModelHost, inference: InferenceWorker, settings: Settings,
) -> list[Detections]:
    """Detections of version `served` on decoded images, the forward pass batched with other requests.

    Args:
        images: B uint8 RGB images, each Tensor[3, H_k, W_k].

    Returns:
        per image, boxes (Tensor[K, 4]) in (x1, y1, x2, y2) pixels of that image, scores [K], labels [K].
    """
    batch = await run_in_threadpool(model_inputs, images, host.spec)  # [B, 3, S, S]
    loc, conf = await forward(request, inference, batch, served, route)  # [B, P, 4], [B, P, C]
    score_threshold, max_detections = detection_options(options, settings)

    def postprocess() -> list[Detections]:
        with torch.inference_mode():
            return detect(
                loc, conf, host.priors, variances=host.spec.prior_config.variance, score_threshold=score_threshold,
                nms_iou=settings.nms_iou, max_detections=max_detections,
                image_sizes=[(image.shape[1], image.shape[2]) for image in images],
            )

    return await run_in_threadpool(postprocess)


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
    found = await detect_images(request, images, options, "/detect", served, host, inference, settings)
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


def render_png(image: Tensor, found: Detections, settings: Settings) -> bytes:
    """`image` (Tensor[3, H, W] uint8) with `found` (pixel boxes) drawn, as PNG bytes."""
    names = [settings.class_name(label) for label in found.labels.tolist()]
    return draw_detections(image, found.boxes, captions(names, found.scores.tolist()))
