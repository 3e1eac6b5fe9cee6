"""The deterministic synthetic shapes data set."""

import math
from collections import Counter

import pytest
import torch

from ssd_core.data.datasets import Sample
from ssd_core.data.synthetic import CLASS_NAMES, ShapesDataset


@pytest.fixture(scope="module")
def dataset():
    return ShapesDataset(24, image_size=96, seed=3)


def test_sample_types_and_shapes(dataset):
    sample = dataset[0]
    assert isinstance(sample, Sample)
    n = len(sample.labels)
    assert sample.image.shape == (3, 96, 96) and sample.image.dtype == torch.uint8
    assert sample.boxes.shape == (n, 4) and sample.boxes.dtype == torch.float32
    assert sample.labels.dtype == torch.int64 and sample.difficult.dtype == torch.bool
    assert not sample.difficult.any()
    assert 1 <= n <= 4
    assert len(dataset) == 24 and dataset.num_classes == 4 and CLASS_NAMES == ("rectangle", "ellipse", "triangle")


def test_same_seed_gives_same_pixels_and_boxes(dataset):
    again = ShapesDataset(24, image_size=96, seed=3)
    for index in (0, 7, 23):
        a, b = dataset[index], again[index]
        assert torch.equal(a.image, b.image)
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)


def test_indices_seeds_and_splits_differ(dataset):
    assert not torch.equal(dataset[0].image, dataset[1].image)
    assert not torch.equal(dataset[0].image, ShapesDataset(24, image_size=96, seed=4)[0].image)
    held_out = ShapesDataset(24, image_size=96, seed=3, split="val")
    assert not torch.equal(dataset[0].image, held_out[0].image)


def test_boxes_are_the_tight_bounds_of_each_drawn_shape(dataset):
    for index in range(len(dataset)):
        sample, masks = dataset.render(index)
        assert masks.shape == (len(sample.labels), 96, 96)
        for box, mask in zip(sample.boxes, masks, strict=True):
            rows = mask.any(dim=1).nonzero().flatten()
            cols = mask.any(dim=0).nonzero().flatten()
            expected = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
            assert torch.equal(box, expected)
            assert (box >= 0).all() and (box[2:] <= 96).all()


def test_masks_are_what_was_drawn(dataset):
    # The visible part of each shape (not covered by later ones) has one flat colour in the image.
    for index in range(len(dataset)):
        sample, masks = dataset.render(index)
        covered = torch.zeros(96, 96, dtype=torch.bool)
        for mask in masks.flip(0):
            visible = mask & ~covered
            pixels = sample.image[:, visible]  # [3, K]
            assert pixels.shape[1] > 0
            assert (pixels == pixels[:, :1]).all()
            covered |= mask


def test_shape_area_matches_its_class(dataset):
    # Filled fraction of the box: rectangle 1, ellipse pi/4, triangle 1/2 (pixel-centre sampling).
    expected = {0: 1.0, 1: math.pi / 4, 2: 0.5}
    for index in range(len(dataset)):
        sample, masks = dataset.render(index)
        for box, label, mask in zip(sample.boxes, sample.labels, masks, strict=True):
            area = (box[2] - box[0]) * (box[3] - box[1])
            fraction = float(mask.sum() / area)
            assert fraction == pytest.approx(expected[int(label)], abs=0.12)


def test_objects_overlap_little_and_have_the_configured_size(dataset):
    for index in range(len(dataset)):
        boxes = dataset[index].boxes
        sides = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        assert (sides >= 0.1 * 96 - 2).all() and (sides <= 0.7 * 96 + 1).all()
        inter_lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
        inter_rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
        inter = (inter_rb - inter_lt).clamp(min=0).prod(dim=2)  # [N, N]
        area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
        smaller = torch.minimum(area[:, None], area[None, :])
        off_diagonal = ~torch.eye(len(boxes), dtype=torch.bool)
        # placement allows 20% of the smaller box; pixel snapping adds a little
        assert (inter / smaller)[off_diagonal].le(0.3).all()


def test_label_distribution_covers_all_classes():
    counts = Counter(int(label) for sample in ShapesDataset(30, image_size=64) for label in sample.labels)
    assert set(counts) == {0, 1, 2}
    assert min(counts.values()) >= 0.15 * sum(counts.values())


def test_object_count_parameters_are_respected():
    dataset = ShapesDataset(10, image_size=64, min_objects=2, max_objects=2, max_size=0.3)
    assert all(len(sample.labels) == 2 for sample in dataset)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_images": -1},
        {"num_images": 1, "image_size": 4},
        {"num_images": 1, "min_objects": 3, "max_objects": 2},
        {"num_images": 1, "min_size": 0.5, "max_size": 0.2},
    ],
)
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        ShapesDataset(**kwargs)


def test_index_out_of_range_raises(dataset):
    with pytest.raises(IndexError):
        dataset[24]
