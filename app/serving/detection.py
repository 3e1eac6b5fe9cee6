"""Detection with the hosted model: decoded images -> scored boxes in each image's pixels, the forward
pass batched with every other request's (`POST /detect` and the Open Inference Protocol's `ssd` model),
and the PNG of one image with its detections drawn."""

from __future__ import annotations

import torch
from anyio import to_thread
from torch import Tensor

from app.core.settings import Settings
from app.serving.inference import InferenceWorker, WaitForDisconnect, forward
from app.serving.model_host import ModelHost, ModelVersion
from ssd_core.data.images import model_inputs
from ssd_core.evaluation.drawing import captions, draw_detections
from ssd_core.models.postprocess import Detections, detect_with_spec


async def detect_images(
    client_gone: WaitForDisconnect, images: list[Tensor], score_threshold: float | None, max_detections: int | None,
    route: str, served: ModelVersion, host: ModelHost, inference: InferenceWorker, settings: Settings,
) -> list[Detections]:
    """Detections of version `served` on decoded images, the forward pass batched with other requests.

    Args:
        client_gone: returns once the request's client has disconnected (`forward` abandons the request).
        images: B uint8 RGB images, each Tensor[3, H_k, W_k].
        score_threshold, max_detections: the request's, None for the settings' default.

    Returns:
        per image, boxes (Tensor[K, 4]) in (x1, y1, x2, y2) pixels of that image, scores [K], labels [K].

    Raises:
        Unavailable: the inference queue is full.
        ClientGone: the client went away before the result.
    """
    batch = await to_thread.run_sync(model_inputs, images, host.spec)  # [B, 3, S, S]
    loc, conf = await forward(client_gone, inference, batch, served, route)  # [B, P, 4], [B, P, C]
    threshold = settings.score_threshold if score_threshold is None else score_threshold
    limit = max_detections or settings.max_detections

    def postprocess() -> list[Detections]:
        with torch.inference_mode():
            return detect_with_spec(
                host.spec, loc, conf, host.priors, score_threshold=threshold, nms_iou=settings.nms_iou,
                max_detections=limit,
                image_sizes=[(image.shape[1], image.shape[2]) for image in images],
            )

    return await to_thread.run_sync(postprocess)


def render_png(image: Tensor, found: Detections, settings: Settings) -> bytes:
    """`image` (Tensor[3, H, W] uint8) with `found` (pixel boxes) drawn, as PNG bytes."""
    names = [settings.class_name(label) for label in found.labels.tolist()]
    return draw_detections(image, found.boxes, captions(names, found.scores.tolist()))
