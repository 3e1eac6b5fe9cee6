"""Detection with the hosted model: decoded images -> scored boxes in each image's pixels, the forward
pass batched with every other request's and the boxes decoded on the inference thread with the rest of its
batch (`POST /detect`, the Open Inference Protocol's `ssd` model, Label Studio's predictions), and the PNG
of one image with its detections drawn."""

from __future__ import annotations

from anyio import to_thread
from torch import Tensor

from app.core.settings import Settings
from app.serving.inference import (
    DetectionOptions,
    InferenceWorker,
    Queued,
    WaitForDisconnect,
    queue_request,
    queued_detections,
)
from app.serving.model_host import ModelHost, ModelVersion
from ssd_core.data.images import model_inputs
from ssd_core.evaluation.drawing import captions, draw_detections
from ssd_core.models.base import ModelSpec
from ssd_core.models.postprocess import Detections


def prepare_images(images: list[Tensor], spec: ModelSpec) -> tuple[Tensor, list[tuple[int, int]]]:
    """Decoded images -> (the model batch [B, 3, S, S], each image's (height, width)); run it in a worker
    thread together with the decoding (one hop)."""
    return model_inputs(images, spec), [(image.shape[1], image.shape[2]) for image in images]


def queue_detection(
    batch: Tensor, image_sizes: list[tuple[int, int]], score_threshold: float | None, max_detections: int | None,
    route: str, served: ModelVersion, inference: InferenceWorker, settings: Settings,
) -> Queued:
    """Queue a prepared batch (`prepare_images`) for the inference thread with the settings' defaults; callable from
    any thread, so a route queues from its worker-thread hop. Await the detections with `queued_detections`.

    Args:
        batch (Tensor[B, 3, S, S]): normalised model input; image_sizes: (height, width) of each original image.
        score_threshold, max_detections: the request's, None for the settings' default.

    Raises:
        Unavailable: the inference queue is full.
    """
    options = DetectionOptions(
        settings.score_threshold if score_threshold is None else score_threshold,
        max_detections or settings.max_detections, settings.nms_iou, image_sizes,
    )
    return queue_request(inference, batch, served, route, options)


async def detect_images(
    client_gone: WaitForDisconnect, images: list[Tensor], score_threshold: float | None, max_detections: int | None,
    route: str, served: ModelVersion, host: ModelHost, inference: InferenceWorker, settings: Settings,
) -> list[Detections]:
    """Detections of version `served` on decoded images (B uint8 RGB images, each Tensor[3, H_k, W_k]), prepared
    and queued in one worker-thread hop.

    Args:
        client_gone: returns once the request's client has disconnected (the request is abandoned).

    Returns:
        per image, boxes (Tensor[K, 4]) in (x1, y1, x2, y2) pixels of that image, scores [K], labels [K].

    Raises:
        Unavailable: the inference queue is full.
        ClientGone: the client went away before the result.
    """

    def prepared_and_queued() -> Queued:
        batch, sizes = prepare_images(images, host.spec)
        return queue_detection(batch, sizes, score_threshold, max_detections, route, served, inference, settings)

    return await queued_detections(client_gone, inference, await to_thread.run_sync(prepared_and_queued))


def render_png(image: Tensor, found: Detections, settings: Settings) -> bytes:
    """`image` (Tensor[3, H, W] uint8) with `found` (pixel boxes) drawn, as PNG bytes."""
    classes = found.labels.tolist()
    names = [settings.class_name(label) for label in classes]
    return draw_detections(image, found.boxes, captions(names, found.scores.tolist()), classes)
