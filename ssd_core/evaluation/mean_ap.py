"""Detection quality: run a model over a data set and score it with COCO-style mAP.

`map_50` is the mAP at IoU 0.5 (the VOC criterion, computed with COCO's 101-point interpolation) and
`map` the COCO mAP averaged over IoU 0.5:0.95, both by `torchmetrics.detection.MeanAveragePrecision`
(pycocotools backend). Difficult (VOC) / crowd (COCO) truths are passed as `iscrowd`: matching one
neither helps nor hurts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision
from tqdm import tqdm

from ssd_core.data.datasets import Sample
from ssd_core.data.images import model_inputs
from ssd_core.models.postprocess import Detections, detect_with_spec

__all__ = ["average_precision_50", "evaluate", "mean_average_precision", "predict"]


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Sequence[Tensor],
    *,
    device: torch.device | str = "cpu",
    score_threshold: float = 0.01,
    nms_iou: float = 0.45,
    max_detections: int = 100,
) -> list[Detections]:
    """Detect objects in a batch of images (model in eval mode).

    Args:
        model: an SSD with `spec` (image_size, pixel_mean, pixel_std, prior_config) on `device`.
        images: B uint8 RGB images, each Tensor[3, H_i, W_i] of any size.
        score_threshold, nms_iou, max_detections: see `postprocess.detect`.

    Returns:
        One `Detections` per image: boxes (Tensor[K, 4]) in (x1, y1, x2, y2) pixels of that image,
        scores [K], labels [K] 0-based.
    """
    spec = model.spec
    batch = model_inputs(images, spec)  # [B, 3, S, S]
    model.eval()
    loc, conf, priors = model(batch.to(device))  # [B, P, 4], [B, P, C], [P, 4]
    return detect_with_spec(
        spec,
        loc.float(),
        conf.float(),
        priors,
        score_threshold=score_threshold,
        nms_iou=nms_iou,
        max_detections=max_detections,
        image_sizes=[(im.shape[-2], im.shape[-1]) for im in images],
    )


def _metric(max_detections: int) -> MeanAveragePrecision:
    # never synchronised over a process group: under torchrun rank 0 scores the held-out set alone
    # (compute() would otherwise all-gather the state of ranks that do not evaluate and block)
    return MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        max_detection_thresholds=[1, 10, max_detections],
        sync_on_compute=False,
    )


def _update(
    metric: MeanAveragePrecision, detections: Sequence[Detections], samples: Sequence[Sample]
) -> None:
    if len(detections) != len(samples):
        raise ValueError(f"got {len(detections)} detections for {len(samples)} samples")
    preds = [
        {"boxes": d.boxes.cpu().float(), "scores": d.scores.cpu().float(), "labels": d.labels.cpu().long()}
        for d in detections
    ]
    truths = [
        {"boxes": s.boxes.float(), "labels": s.labels.long(), "iscrowd": s.difficult.long()} for s in samples
    ]
    metric.update(preds, truths)


def _result(metric: MeanAveragePrecision) -> dict[str, float]:
    result = metric.compute()
    return {"map_50": float(result["map_50"]), "map": float(result["map"])}


def mean_average_precision(
    detections: Sequence[Detections], samples: Sequence[Sample], max_detections: int = 100
) -> dict[str, float]:
    """Score detections against the samples' truths.

    Args:
        detections: per image, pixel (x1, y1, x2, y2) boxes with scores and 0-based labels.
        samples: the same images' truths (pixel (x1, y1, x2, y2) boxes, labels, difficult flags).
        max_detections: detections per image considered (COCO's largest maxDets).

    Returns:
        {"map_50": mAP@0.5, "map": mAP@[0.5:0.95]}; -1.0 for both when there are no truths at all.
    """
    metric = _metric(max_detections)
    _update(metric, detections, samples)
    return _result(metric)


def average_precision_50(
    detections: Sequence[Detections], samples: Sequence[Sample], max_detections: int = 100
) -> tuple[float, dict[int, float]]:
    """AP at IoU 0.5 overall and per class (torchmetrics at the one threshold 0.5).

    Args:
        detections: per image, pixel (x1, y1, x2, y2) boxes with scores and 0-based labels.
        samples: the same images' truths.

    Returns:
        (mAP@0.5 (-1.0 without truths), {0-based label: AP@0.5} for every class with a truth or a detection;
        -1.0 for a class without truths).
    """
    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5], max_detection_thresholds=[1, 10, max_detections],
        class_metrics=True, sync_on_compute=False,
    )
    _update(metric, detections, samples)
    result = metric.compute()
    classes = result["classes"].reshape(-1).tolist()  # [K]
    per_class = result["map_per_class"].reshape(-1).tolist()  # [K]
    return float(result["map_50"]), {int(c): float(ap) for c, ap in zip(classes, per_class, strict=True)}


def evaluate(
    model: nn.Module,
    dataset: Sequence[Sample],
    *,
    batch_size: int,
    device: torch.device | str,
    score_threshold: float = 0.01,
    max_detections: int = 100,
    nms_iou: float = 0.45,
    progress: bool = False,
) -> dict[str, float]:
    """mAP of `model` on every sample of `dataset` (no augmentation), batch by batch.

    Args:
        model: an SSD with `spec`, on `device`.
        dataset: indexable samples (e.g. `ShapesDataset`, `VOCDataset`, `CocoDataset`).
        batch_size: images per forward pass.
        progress: a tqdm bar of the images done (on stderr).

    Returns:
        {"map_50": mAP@0.5 (VOC criterion), "map": COCO mAP@[0.5:0.95]}.

    Local to this process: nothing is synchronised over a `torch.distributed` process group, so one
    rank of a torchrun job can evaluate while the others wait (see `ssd train --eval-every`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    metric = _metric(max_detections)
    bar = tqdm(total=len(dataset), desc="eval", unit="image", disable=not progress)
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        detections = predict(
            model,
            [s.image for s in samples],
            device=device,
            score_threshold=score_threshold,
            nms_iou=nms_iou,
            max_detections=max_detections,
        )
        _update(metric, detections, samples)
        bar.update(len(samples))
    bar.close()
    return _result(metric)
