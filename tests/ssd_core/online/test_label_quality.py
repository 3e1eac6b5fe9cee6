"""Label-quality checks (ssd_core.online.label_quality) on hand-made annotations and detections: a swapped
label, a moved box and an overlooked object each found; confirmed boxes, unsure detections and classes an
image declares unlabelled are not issues."""

from __future__ import annotations

import pytest
import torch

from ssd_core.data.datasets import Sample
from ssd_core.models.postprocess import Detections
from ssd_core.online.label_quality import LabelCheckConfig, check_labels, disagreement

CONFIG = LabelCheckConfig(confidence=0.6, match_iou=0.5, quarantine_share=0.5)


def sample(boxes: list[list[float]], labels: list[int], labelled_classes=None) -> Sample:
    return Sample(torch.zeros(3, 100, 100, dtype=torch.uint8), torch.tensor(boxes).reshape(-1, 4),
                  torch.tensor(labels, dtype=torch.long), torch.zeros(len(labels), dtype=torch.bool), labelled_classes)


def found(boxes: list[list[float]], labels: list[int], scores: list[float]) -> Detections:
    return Detections(torch.tensor(boxes).reshape(-1, 4), torch.tensor(scores), torch.tensor(labels, dtype=torch.long))


def test_confirmed_boxes_and_unsure_detections_are_no_issue():
    truth = sample([[10, 10, 40, 40], [50, 50, 90, 80]], [0, 2])
    assert check_labels(truth, found([[11, 10, 41, 40], [50, 52, 90, 80]], [0, 2], [0.9, 0.7]), CONFIG) == []
    # the model is unsure (below the confidence) of another class and of an unlabelled object
    unsure = found([[10, 10, 40, 40], [60, 5, 95, 30]], [1, 1], [0.4, 0.5])
    assert check_labels(truth, unsure, CONFIG) == []
    assert check_labels(truth, found([], [], []), CONFIG) == []


def test_a_swapped_label_is_found_with_the_models_box_label_and_score():
    truth = sample([[10, 10, 40, 40], [50, 50, 90, 80]], [0, 2])
    issues = check_labels(truth, found([[11, 11, 40, 41], [50, 50, 90, 80]], [1, 2], [0.95, 0.8]), CONFIG)
    assert len(issues) == 1
    issue = issues[0]
    assert (issue.box, issue.kind, issue.model_label, issue.model_score) == (0, "swapped_label", 1, pytest.approx(0.95))
    assert issue.model_box == (11.0, 11.0, 40.0, 41.0)
    assert disagreement(issues, 2) == 0.5


def test_a_moved_box_is_a_bad_location_and_its_object_not_also_overlooked():
    # the annotation shifted right and down by half its size: IoU 0.14 with the object the model sees
    truth = sample([[25, 25, 55, 55]], [0])
    issues = check_labels(truth, found([[10, 10, 40, 40]], [0], [0.9]), CONFIG)
    assert [(i.box, i.kind, i.model_box) for i in issues] == [(0, "bad_location", (10.0, 10.0, 40.0, 40.0))]
    assert disagreement(issues, 1) == 1.0
    # a second confident object beside it that no box covers is still overlooked
    issues = check_labels(truth, found([[10, 10, 40, 40], [60, 60, 90, 90]], [0, 0], [0.9, 0.9]), CONFIG)
    assert [(i.box, i.kind, i.model_box) for i in issues] == [(0, "bad_location", (10.0, 10.0, 40.0, 40.0)),
                                                              (None, "overlooked_object", (60.0, 60.0, 90.0, 90.0))]
    # a same-class detection that confirms another box is that box's, not a sign the first one moved
    pair = sample([[10, 10, 40, 40], [30, 30, 60, 60]], [0, 0])
    assert check_labels(pair, found([[10, 10, 40, 40]], [0], [0.9]), CONFIG) == []


def test_one_detection_is_the_place_of_at_most_one_moved_box():
    """Two touching boxes of a class that the model sees as one object: one bad_location, not two, so a
    clean image with merged objects is not quarantined for it; two boxes each beside their own detection
    are both moved."""
    touching = sample([[10, 10, 50, 40], [12, 38, 48, 90]], [0, 0])
    merged = found([[8, 20, 52, 70]], [0], [0.95])  # IoU 0.31 with the first box, 0.39 with the second
    issues = check_labels(touching, merged, CONFIG)
    assert [(i.box, i.kind) for i in issues] == [(1, "bad_location")]
    assert disagreement(issues, 2) == 0.5
    shifted = sample([[25, 25, 55, 55], [75, 15, 95, 45]], [0, 0])
    issues = check_labels(shifted, found([[10, 10, 40, 40], [65, 0, 85, 30]], [0, 0], [0.9, 0.9]), CONFIG)
    assert [(i.box, i.kind) for i in issues] == [(0, "bad_location"), (1, "bad_location")]


def test_an_overlooked_object_is_found_unless_its_class_is_declared_unlabelled():
    truth = sample([[10, 10, 40, 40], [50, 50, 90, 80]], [0, 2])
    detections = found([[10, 10, 40, 40], [50, 50, 90, 80], [5, 60, 35, 95]], [0, 2, 1], [0.9, 0.9, 0.85])
    issues = check_labels(truth, detections, CONFIG)
    assert [(i.box, i.kind, i.model_label) for i in issues] == [(None, "overlooked_object", 1)]
    assert disagreement(issues, 2) == 0.5
    partial = sample([[10, 10, 40, 40], [50, 50, 90, 80]], [0, 2], labelled_classes=(0, 2))
    assert check_labels(partial, detections, CONFIG) == []  # class 1 was not labelled in this image


def test_the_rule_can_fail_a_confidence_above_the_detections_sees_nothing():
    truth = sample([[10, 10, 40, 40]], [0])
    strict = LabelCheckConfig(confidence=0.95)
    assert check_labels(truth, found([[10, 10, 40, 40]], [1], [0.9]), strict) == []
    assert check_labels(truth, found([[10, 10, 40, 40]], [1], [0.9]), CONFIG)[0].kind == "swapped_label"
    with pytest.raises(ValueError, match="confidence"):
        LabelCheckConfig(confidence=1.5)
