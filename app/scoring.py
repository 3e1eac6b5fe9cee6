"""The served model's loss on labelled images: the image form of `POST /score-loss`, also what
screening (app.publishing) scores a fine-tune batch with, so both read the same figure."""

from __future__ import annotations

import torch

from app.model_host import ModelHost, ModelVersion
from ssd_core.datasets import Sample, collate
from ssd_core.loss import LossOutput, MultiBoxLoss
from ssd_core.partial_labels import labelled_class_mask


def score_samples(samples: list[Sample], host: ModelHost, criterion: MultiBoxLoss) -> tuple[LossOutput, ModelVersion]:
    """Run the current version on `samples` (pixel (x1, y1, x2, y2) truths) and score its predictions;
    images that declare `labelled_classes` are scored with their class mask (`ssd_core.partial_labels`).

    Returns:
        (the loss with its match statistics, the version that predicted).
    """
    served = host.current
    images, targets = collate(samples, host.spec)  # [B, 3, S, S], list[[n, 6]] normalised
    class_mask = labelled_class_mask(  # [B, C] or None
        [s.labelled_classes for s in samples], criterion.num_classes, criterion.background_label)
    loc, conf, priors = host.predict(images, served)  # [B, P, 4], [B, P, C], [P, 4]
    with torch.inference_mode():
        return criterion.compute((loc, conf, priors), targets, class_mask), served
