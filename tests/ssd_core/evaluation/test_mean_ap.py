"""evaluate / mean_average_precision: perfect detections score 1, none score 0, pixel scaling is right."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssd_core.data.datasets import Sample
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.evaluation.mean_ap import evaluate, mean_average_precision, predict
from ssd_core.models import ModelSpec, build_model
from ssd_core.models.postprocess import Detections
from ssd_core.ops.boxes import center_size
from ssd_core.ops.priors import VOC_300


def _sample(height: int = 120, width: int = 200) -> Sample:
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0], [120.0, 5.0, 190.0, 60.0], [30.0, 30.0, 60.0, 50.0]])
    return Sample(
        torch.zeros(3, height, width, dtype=torch.uint8),
        boxes,
        torch.tensor([0, 2, 1]),
        torch.tensor([False, False, True]),
    )


class OracleSSD(nn.Module):
    """Predicts one image's truths exactly: its priors are the truths, its offsets zero, its logits one-hot.

    Built for one sample; `evaluate` must map the model's normalised output back to that sample's
    pixels, so any scaling mistake (e.g. (h, w) swapped) loses the perfect score.
    """

    def __init__(self, sample: Sample, num_classes: int = 4) -> None:
        super().__init__()
        height, width = sample.image.shape[-2:]
        normalised = sample.boxes / torch.tensor([width, height, width, height])
        self.register_buffer("priors", center_size(normalised))  # [P, 4] cxcywh
        logits = torch.full((len(sample.labels), num_classes), -10.0)
        logits[torch.arange(len(sample.labels)), sample.labels + 1] = 10.0  # column 0 is background
        self.register_buffer("logits", logits)  # [P, C]
        self.spec = ModelSpec("oracle", num_classes, 32, VOC_300, (0.0,) * 3, (1.0,) * 3, "voc")

    def forward(self, x):
        batch = x.shape[0]
        loc = torch.zeros(batch, len(self.priors), 4)
        return loc, self.logits.expand(batch, -1, -1), self.priors


def test_evaluate_with_perfect_predictions_is_one():
    sample = _sample()
    result = evaluate(OracleSSD(sample), [sample, sample], batch_size=2, device="cpu")
    assert result == {"map_50": pytest.approx(1.0), "map": pytest.approx(1.0)}


def test_perfect_predictions_on_a_transposed_image_are_not_perfect():
    sample = _sample()
    transposed = Sample(sample.image.transpose(1, 2), sample.boxes, sample.labels, sample.difficult)
    result = evaluate(OracleSSD(sample), [transposed], batch_size=1, device="cpu")
    assert result["map_50"] < 1.0


def test_empty_predictions_score_zero():
    sample = _sample()
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert mean_average_precision([empty], [sample]) == {"map_50": 0.0, "map": 0.0}


def test_difficult_truths_are_ignored_and_boxes_off_by_iou_count():
    sample = _sample()
    # only the two non-difficult truths, the second shifted to IoU ~0.71 with its truth
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0], [132.0, 5.0, 202.0, 60.0]])
    found = Detections(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 2]))
    result = mean_average_precision([found], [sample])
    assert result["map_50"] == pytest.approx(1.0)  # missing the difficult truth costs nothing
    assert 0.5 < result["map"] < 1.0  # the shifted box fails the stricter IoU thresholds


def test_mismatched_lengths_are_a_value_error():
    with pytest.raises(ValueError, match="detections"):
        mean_average_precision([], [_sample()])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(OracleSSD(_sample()), [_sample()], batch_size=0, device="cpu")


def test_predict_returns_pixel_boxes_for_a_real_model():
    torch.manual_seed(0)
    model = build_model("ssd-small", ShapesDataset.num_classes)
    images = [torch.zeros(3, 90, 140, dtype=torch.uint8), torch.zeros(3, 50, 60, dtype=torch.uint8)]
    detections = predict(model, images, score_threshold=0.0, max_detections=7)
    assert [len(d.scores) for d in detections] == [7, 7]
    for det, image in zip(detections, images, strict=True):
        height, width = image.shape[-2:]
        assert det.boxes.shape == (7, 4)
        assert (det.boxes[:, 2] <= width).all() and (det.boxes[:, 3] <= height).all()
        assert ((det.labels >= 0) & (det.labels < 3)).all()
    assert not model.training
