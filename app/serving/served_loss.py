"""The served model's loss on labelled images: the image form of `POST /score-loss`, also what
screening (app.online.gatekeeper) scores a fine-tune batch with, so both read the same figure. The route runs
the forward pass through the dynamic batcher (`served_loss_batched`), screening calls the host directly
(`served_loss`); the inputs and the loss are these functions in both."""

from __future__ import annotations

import torch
from anyio import to_thread
from torch import Tensor

from app.core.metrics import Metrics
from app.serving.inference import InferenceWorker, WaitForDisconnect, forward
from app.serving.model_host import ModelHost, ModelVersion
from ssd_core.data.datasets import Sample, collate
from ssd_core.loss.multibox import LossOutput, MultiBoxLoss
from ssd_core.loss.partial_labels import labelled_class_mask
from ssd_core.models import ModelSpec


def loss_inputs(
    samples: list[Sample], spec: ModelSpec, criterion: MultiBoxLoss
) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """Model input, targets and class mask of `samples` (pixel (x1, y1, x2, y2) truths).

    Returns:
        images (Tensor[B, 3, S, S]), targets (list of Tensor[n_i, 6], normalised), class_mask (Tensor[B, C]
        bool, or None when no image declares `labelled_classes`).
    """
    images, targets = collate(samples, spec)
    class_mask = labelled_class_mask(
        [s.labelled_classes for s in samples], criterion.num_classes, criterion.background_label)
    return images, targets, class_mask


def predictions_loss(
    loc: Tensor, conf: Tensor, priors: Tensor, targets: list[Tensor], class_mask: Tensor | None,
    criterion: MultiBoxLoss,
) -> LossOutput:
    """The loss of predictions loc (Tensor[B, P, 4]) and conf (Tensor[B, P, C]) on priors (Tensor[P, 4])."""
    with torch.inference_mode():
        return criterion.compute((loc, conf, priors), targets, class_mask)


def served_loss(samples: list[Sample], host: ModelHost, criterion: MultiBoxLoss) -> tuple[LossOutput, ModelVersion]:
    """Run the current version on `samples` and score its predictions.

    Returns:
        (the loss with its match statistics, the version that predicted).
    """
    served = host.current
    images, targets, class_mask = loss_inputs(samples, host.spec, criterion)
    loc, conf, priors = host.predict(images, served)  # [B, P, 4], [B, P, C], [P, 4]
    return predictions_loss(loc, conf, priors, targets, class_mask, criterion), served


async def served_loss_batched(
    client_gone: WaitForDisconnect, images: Tensor, targets: list[Tensor], class_mask: Tensor | None,
    criterion: MultiBoxLoss, route: str, host: ModelHost, inference: InferenceWorker, metrics: Metrics,
) -> tuple[LossOutput, ModelVersion]:
    """Run the current version on `images` (Tensor[B, 3, S, S], as `loss_inputs` gives them) through the
    batcher, its forward pass shared with other requests, and score its predictions.

    Args:
        client_gone: returns once the request's client has disconnected (`forward` abandons the request).

    Returns:
        (the loss with its match statistics, the version that predicted).

    Raises:
        Unavailable: the inference queue is full.
        ClientGone: the client went away before the result.
    """
    served = host.current
    loc, conf = await forward(client_gone, inference, images, served, route)  # [B, P, 4], [B, P, C]
    metrics.images_processed.labels(route=route).inc(len(images))
    output = await to_thread.run_sync(predictions_loss, loc, conf, host.priors, targets, class_mask, criterion)
    return output, served
