"""The Open Inference Protocol (KServe v2 REST, as Triton and KServe speak it): health, server and model
metadata, and inference of two models with JSON tensors or the binary tensor data extension.

* `ssd`: the hosted detector, the same detections as `POST /detect` (its forward passes are batched with
  every other route's);
* `ssd-loss`: the MultiBoxLoss of given predictions, the same numbers as `POST /score-loss`.

Both models report the served model version (`ssd-loss` scores with its priors and classes); the
`/versions/{version}` forms accept that version only. Errors are `{"error": "<message>"}` with a 4xx status.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from app.api.deps import HostDep, InferenceDep, MetricsDep, SettingsDep
from app.api.disconnect import wait_for_disconnect
from app.api.errors import ApiError, from_validation_error
from app.api.inputs import check_image_count, decode_image, validate_as
from app.api.loss_batch import tensor_batch
from app.api.loss_requests import batch_loss, loss_response
from app.api.schemas import DetectOptions, LossOptions
from app.api.v2_codec import (
    HEADER_LENGTH,
    CodecError,
    InferRequest,
    encode_infer_response,
    parse_infer_request,
)
from app.core.metrics import INFERENCE_ROUTES, Metrics, record_match_stats
from app.core.settings import Settings
from app.serving.detection import prepare_images, queue_detection
from app.serving.inference import InferenceWorker, Queued, queued_detections
from app.serving.model_host import ModelHost, ModelVersion
from ssd_core.models.postprocess import Detections

DETECTOR, LOSS = "ssd", "ssd-loss"
ROUTE = INFERENCE_ROUTES[2]  # the `route` label of the detector's inference metrics
# request parameters the protocol reserves (Triton's client may send them); accepted and ignored here
_RESERVED = {"binary_data_output", "priority", "timeout", "sequence_id", "sequence_start", "sequence_end"}


class ProtocolRoute(APIRoute):
    """Answers every error of these routes in the protocol's shape, `{"error": "<message>"}`."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def protocol_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as error:
                return JSONResponse({"error": error.message}, error.status, headers=error.headers)
            except RequestValidationError as error:
                failure = from_validation_error(error.errors())
                return JSONResponse({"error": failure.message}, 400)

        return protocol_handler


router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=ProtocolRoute)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_inference_request", message)


# ---- metadata


def tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def model_metadata(name: str, version: int, settings: Settings) -> dict[str, Any]:
    """The protocol's model metadata (-1: a dimension of any size)."""
    classes = settings.num_classes
    if name == DETECTOR:
        inputs = [tensor("images", "UINT8", [-1, -1, -1, 3])]  # or BYTES [B]: encoded PNG/JPEG/WebP (docs/api.md)
        outputs = [tensor("boxes", "FP32", [-1, -1, 4]), tensor("scores", "FP32", [-1, -1]),
                   tensor("labels", "INT64", [-1, -1]), tensor("num_detections", "INT32", [-1])]
    else:
        inputs = [tensor("loc", "FP32", [-1, -1, 4]), tensor("conf", "FP32", [-1, -1, classes]),
                  tensor("targets", "FP32", [-1, -1, -1]), tensor("priors", "FP32", [-1, 4])]
        outputs = [tensor(n, "FP32", [1]) for n in ("loss", "loss_l", "loss_c")] + [
            tensor(n, "FP32", [-1]) for n in ("image_loss_l", "image_loss_c", "mean_matched_iou")] + [
            tensor(n, "INT64", [-1]) for n in _COUNTS]
    return {"name": name, "versions": [str(version)], "platform": "pytorch", "inputs": inputs, "outputs": outputs}


def served_version(host: ModelHost, name: str, version: str | None) -> ModelVersion:
    """The served version, when `name` is a model here and `version` (if given) is the served one; else 404."""
    if name not in (DETECTOR, LOSS):
        raise ApiError(404, "unknown_model", f"model {name!r} is not served here; models: {DETECTOR}, {LOSS}")
    served = host.current
    if version is not None and version != str(served.version):
        raise ApiError(404, "unknown_version", f"model {name!r} serves version {served.version}, not {version!r}")
    return served


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "ssd-service", "version": request.app.version, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="The server is alive")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="The models can infer (503 until the model is loaded)")
async def ready(request: Request) -> dict[str, bool]:
    state = request.app.state
    watcher = getattr(state, "watcher", None)
    if getattr(state, "host", None) is None or getattr(state, "inference", None) is None:
        raise ApiError(503, "not_ready", "the model is not loaded")
    if watcher is not None and not watcher.synced:
        raise ApiError(503, "not_ready", "waiting for the trainer's first checkpoint")
    return {"ready": True}


@router.get("/models/{name}", summary="Model metadata: inputs, outputs, the served version")
@router.get("/models/{name}/versions/{version}", summary="Model metadata of the served version")
async def metadata(name: str, host: HostDep, settings: SettingsDep, version: str | None = None) -> dict[str, Any]:
    return model_metadata(name, served_version(host, name, version).version, settings)


@router.get("/models/{name}/ready", summary="The model can infer")
@router.get("/models/{name}/versions/{version}/ready", summary="The served version can infer")
async def model_ready(name: str, host: HostDep, version: str | None = None) -> dict[str, Any]:
    served_version(host, name, version)
    return {"name": name, "ready": True}


# ---- inference


@router.post("/models/{name}/infer", summary="Infer with the served version (JSON or binary tensors)")
@router.post("/models/{name}/versions/{version}/infer", summary="Infer with this version (the served one)")
async def infer(
    name: str, request: Request, host: HostDep, inference: InferenceDep, settings: SettingsDep, metrics: MetricsDep,
    version: str | None = None,
) -> Response:
    served = served_version(host, name, version)
    body, header = await request.body(), request.headers.get(HEADER_LENGTH)
    if name == DETECTOR:
        parsed, outputs = await infer_detector(request, body, header, served, host, inference, settings, metrics)
    else:
        parsed, outputs = await run_in_threadpool(loss_request, body, header, served.version, host, settings, metrics)
    try:
        encoded, header_length = encode_infer_response(name, str(served.version), outputs, parsed)
    except CodecError as error:
        raise bad_request(str(error)) from None
    if header_length is None:
        return Response(encoded, media_type="application/json")
    return Response(encoded, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


def parse(body: bytes, header_length: str | None) -> InferRequest:
    try:
        return parse_infer_request(body, header_length)
    except CodecError as error:
        raise bad_request(str(error)) from None


def expect_inputs(parsed: InferRequest, required: set[str], optional: frozenset[str] = frozenset()) -> None:
    names = set(parsed.inputs)
    missing, unknown = required - names, names - required - optional
    if missing:
        raise bad_request(f"input {sorted(missing)[0]!r} is missing; inputs: {', '.join(sorted(required | optional))}"
                          f"; sent: {', '.join(sorted(names)) or 'none'}")
    if unknown:
        raise bad_request(f"input {sorted(unknown)[0]!r} is unknown; inputs: {', '.join(sorted(required | optional))}"
                          f"; sent: {', '.join(sorted(names))}")


def model_parameters(parsed: InferRequest, adapter: TypeAdapter) -> Any:
    """The request's parameters (reserved ones dropped) validated as the model's options (400 naming one)."""
    values = {key: value for key, value in parsed.parameters.items() if key not in _RESERVED}
    try:
        return validate_as(adapter, values, "parameters")
    except ApiError as error:
        raise bad_request(error.message) from None


_DETECT_OPTIONS = TypeAdapter(DetectOptions)
_LOSS_OPTIONS = TypeAdapter(LossOptions)
_PNG, _JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8"


def image_list(array: np.ndarray, settings: Settings) -> list[torch.Tensor]:
    """`images` UINT8 [B, H, W, 3] or BYTES [B] (PNG/JPEG, or its base64 in JSON) -> B tensors [3, H, W]."""
    if array.dtype == object:
        if array.ndim != 1:
            raise bad_request(f"input 'images' of BYTES must have shape [B], got {list(array.shape)}")
        check_image_count(len(array), settings)
        return [decode_image(_encoded(data, k), settings, f"images[{k}]") for k, data in enumerate(array)]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise bad_request(f"input 'images' must be UINT8 [B, H, W, 3] or BYTES [B], got {array.dtype} "
                          f"{list(array.shape)}")
    batch, height, width, _ = array.shape
    check_image_count(batch, settings)
    if height * width == 0 or height * width > settings.max_image_pixels:
        raise bad_request(f"input 'images': {height}x{width} pixels, the limit is 1..{settings.max_image_pixels} "
                          "(SSD_MAX_IMAGE_PIXELS)")
    pixels = torch.from_numpy(np.array(array))  # [B, H, W, 3], a writable copy
    return list(pixels.permute(0, 3, 1, 2))  # B x [3, H, W]


def _encoded(data: bytes, k: int) -> bytes:
    if data.startswith((_PNG, _JPEG)):
        return data
    try:  # JSON cannot carry raw bytes: BYTES elements there are base64 text
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"images[{k}]: neither PNG/JPEG bytes nor their base64") from None
    return decoded


def detection_tensors(found: list[Detections]) -> list[tuple[str, np.ndarray]]:
    """Per-image detections padded to D = the most in any image (at least 1): boxes [B, D, 4] pixel
    (x1, y1, x2, y2), scores [B, D], labels [B, D] (-1 pads), num_detections [B]."""
    depth = max(1, *(len(d.scores) for d in found))
    boxes = np.zeros((len(found), depth, 4), np.float32)
    scores = np.zeros((len(found), depth), np.float32)
    labels = np.full((len(found), depth), -1, np.int64)
    for b, d in enumerate(found):
        k = len(d.scores)
        boxes[b, :k] = d.boxes.cpu().numpy()
        scores[b, :k] = d.scores.cpu().numpy()
        labels[b, :k] = d.labels.cpu().numpy()
    counts = np.array([len(d.scores) for d in found], np.int32)
    return [("boxes", boxes), ("scores", scores), ("labels", labels), ("num_detections", counts)]


def detector_queued(
    body: bytes, header_length: str | None, served: ModelVersion, host: ModelHost, inference: InferenceWorker,
    settings: Settings,
) -> tuple[InferRequest, int, Queued]:
    """The detector's request parsed, checked, its images decoded, prepared and queued for the inference thread:
    the request's one worker-thread hop, so the forward pass can start before the event loop runs again.
    Returns (the request, its number of images, the queued batch for `queued_detections`)."""
    parsed = parse(body, header_length)
    expect_inputs(parsed, {"images"})
    options = model_parameters(parsed, _DETECT_OPTIONS)
    batch, sizes = prepare_images(image_list(parsed.inputs["images"], settings), host.spec)
    queued = queue_detection(batch, sizes, options.score_threshold, options.max_detections, ROUTE, served, inference,
                             settings)
    return parsed, len(sizes), queued


async def infer_detector(
    request: Request, body: bytes, header_length: str | None, served: ModelVersion, host: ModelHost,
    inference: InferenceWorker, settings: Settings, metrics: Metrics,
) -> tuple[InferRequest, list[tuple[str, np.ndarray]]]:
    parsed, images, queued = await run_in_threadpool(detector_queued, body, header_length, served, host, inference,
                                                     settings)
    found = await queued_detections(wait_for_disconnect(request), inference, queued)
    metrics.images_processed.labels(route=ROUTE).inc(images)
    return parsed, detection_tensors(found)


_COUNTS = ("num_ground_truth", "num_positives", "num_negatives", "num_forced_matches")


def loss_request(
    body: bytes, header_length: str | None, version: int, host: ModelHost, settings: Settings, metrics: Metrics
) -> tuple[InferRequest, list[tuple[str, np.ndarray]]]:
    """`ssd-loss`'s request parsed and scored: the request's one worker-thread hop."""
    parsed = parse(body, header_length)
    return parsed, infer_loss(parsed, version, host, settings, metrics)


def infer_loss(
    parsed: InferRequest, version: int, host: ModelHost, settings: Settings, metrics: Metrics
) -> list[tuple[str, np.ndarray]]:
    """`ssd-loss`: the same validation, loss and statistics as the safetensors form of /score-loss."""
    expect_inputs(parsed, {"loc", "conf", "targets"}, frozenset({"priors"}))
    for name, array in parsed.inputs.items():
        if array.dtype != np.float32:
            raise bad_request(f"input {name!r} must be FP32, got {array.dtype}")
    options = model_parameters(parsed, _LOSS_OPTIONS)
    tensors = {name: torch.from_numpy(np.array(array)) for name, array in parsed.inputs.items()}
    output = batch_loss(tensor_batch(tensors, options, host.priors, settings), settings.num_classes)
    scored = loss_response(output, version, settings.object_class_names())
    record_match_stats(metrics, "score", output)
    per_image = output.stats.per_image()  # what /score-loss answers as `per_image`
    return [
        ("loss", np.array([scored.loss], np.float32)),
        ("loss_l", np.array([scored.loss_l], np.float32)),
        ("loss_c", np.array([scored.loss_c], np.float32)),
        ("image_loss_l", np.array([image["loss_l"] for image in per_image], np.float32)),
        ("image_loss_c", np.array([image["loss_c"] for image in per_image], np.float32)),
        ("mean_matched_iou", np.array([image["mean_matched_iou"] for image in per_image], np.float32)),
        *((name, np.array([image[name] for image in per_image], np.int64)) for name in _COUNTS),
    ]
