"""The benchmark's annotation corruptions (ssd_core.online.corruptions) on a hand-made sample."""

from __future__ import annotations

import torch

from ssd_core.online.corruptions import (
    corrupt_job,
    corruptions,
    drop_half_objects,
    rotate_labels,
    shift_boxes,
    swap_classes,
    wrong_image_scale,
    xywh_as_xyxy,
)
from tests.ssd_core.online.test_label_quality import sample


def test_each_corruption_on_a_hand_made_sample():
    clean = sample([[10, 20, 30, 60], [50, 50, 90, 98], [0, 0, 8, 8]], [0, 1, 2])
    assert shift_boxes(clean).boxes.tolist() == [[20, 40, 40, 80], [70, 74, 100, 100], [4, 4, 12, 12]]
    assert rotate_labels(3)(clean).labels.tolist() == [1, 2, 0]
    assert swap_classes(0, 1)(clean).labels.tolist() == [1, 0, 2]
    half = drop_half_objects(clean)
    assert half.boxes.tolist() == [[10, 20, 30, 60], [0, 0, 8, 8]] and half.labels.tolist() == [0, 2]
    assert xywh_as_xyxy(clean).boxes.tolist() == [[10, 20, 20, 40], [50, 50, 40, 48], [0, 0, 8, 8]]
    assert wrong_image_scale(0.5)(clean).boxes.tolist() == [[5, 10, 15, 30], [25, 25, 45, 49], [0, 0, 4, 4]]
    assert clean.boxes.tolist()[0] == [10, 20, 30, 60] and clean.labels.tolist() == [0, 1, 2]  # untouched
    assert set(corruptions(3)) == {"shifted_boxes", "rotated_labels", "swapped_classes", "half_unlabelled",
                                   "xywh_as_xyxy", "wrong_scale"}


def test_corrupt_job_applies_a_corruption_to_a_share_of_the_images():
    job = [sample([[10, 10, 40, 40]], [0]) for _ in range(20)]
    mixed, chosen = corrupt_job(job, rotate_labels(3), 0.1, seed=1)
    assert len(chosen) == 2 and chosen == sorted(chosen)
    assert [i for i, s in enumerate(mixed) if s.labels.tolist() != [0]] == chosen
    assert corrupt_job(job, rotate_labels(3), 0.1, seed=1)[1] == chosen  # reproducible
    assert len(corrupt_job(job, rotate_labels(3), 0.5, seed=1)[1]) == 10
    assert corrupt_job(job[:3], shift_boxes, 0.1, seed=0)[1] != []  # at least one image
    assert all(torch.equal(a.boxes, b.boxes) for a, b in zip(corrupt_job(job, shift_boxes, 0, 0)[0], job, strict=True))
