"""SSD augmentation: boxes stay valid and aligned, flip is exact, switchable, repeatable."""

import pytest
import torch

from ssd_core.data.augment import AUGMENTATIONS, AugmentConfig, ssd_augmentation
from ssd_core.data.synthetic import ShapesDataset

ONLY_FLIP = AugmentConfig(photometric_p=0.0, zoom_out_p=0.0, iou_crop=False, flip_p=1.0)


@pytest.fixture(scope="module")
def samples():
    return [ShapesDataset(8, image_size=64, seed=11)[i] for i in range(8)]


def _run(augment, sample):
    return augment(sample.image, sample.boxes, sample.labels, sample.difficult)


def test_disabled_is_the_identity(samples):
    sample = samples[0]
    image, boxes, labels, difficult = _run(ssd_augmentation(enabled=False), sample)
    assert image is sample.image and boxes is sample.boxes
    assert labels is sample.labels and difficult is sample.difficult


def test_flip_maps_boxes_exactly(samples):
    augment = ssd_augmentation(config=ONLY_FLIP)
    for sample in samples:
        image, boxes, labels, difficult = _run(augment, sample)
        width = sample.image.shape[-1]
        x1, y1, x2, y2 = sample.boxes.unbind(dim=1)
        torch.testing.assert_close(boxes, torch.stack((width - x2, y1, width - x1, y2), dim=1))
        assert torch.equal(image, sample.image.flip(-1))
        assert torch.equal(labels, sample.labels) and torch.equal(difficult, sample.difficult)


def test_zoom_out_fills_with_the_mean_and_keeps_box_contents():
    sample = ShapesDataset(1, image_size=32, seed=5)[0]
    config = AugmentConfig(photometric_p=0.0, zoom_out_p=1.0, iou_crop=False, flip_p=0.0)
    torch.manual_seed(0)
    image, boxes, labels, _ = _run(ssd_augmentation(fill=(10, 20, 30), config=config), sample)
    assert image.shape[-1] > 32 and image.shape[-2] > 32
    left, top = int(boxes[0, 0] - sample.boxes[0, 0]), int(boxes[0, 1] - sample.boxes[0, 1])
    torch.testing.assert_close(boxes - sample.boxes, torch.tensor([[left, top, left, top]]).float().expand_as(boxes))
    assert torch.equal(image[:, top : top + 32, left : left + 32], sample.image)
    assert image[:, 0, 0].tolist() == [10, 20, 30] or image[:, -1, -1].tolist() == [10, 20, 30]
    assert torch.equal(labels, sample.labels)


def test_full_recipe_keeps_boxes_inside_and_aligned(samples):
    # Tag each box with a unique difficult/label pattern and check the pairs survive together.
    augment = ssd_augmentation()
    torch.manual_seed(1)
    for _ in range(5):
        for sample in samples:
            n = len(sample.labels)
            labels = torch.arange(n) * 10 + sample.labels  # unique per box, class recoverable
            difficult = torch.arange(n) % 2 == 1
            image, boxes, out_labels, out_difficult = augment(sample.image, sample.boxes, labels, difficult)
            assert image.dtype == torch.uint8 and image.shape[0] == 3
            assert boxes.dtype == torch.float32 and boxes.shape == (len(out_labels), 4)
            assert len(out_difficult) == len(out_labels)
            height, width = image.shape[-2:]
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
            original_index = out_labels // 10
            assert torch.equal(out_difficult, original_index % 2 == 1)
            assert torch.equal(out_labels % 10, sample.labels[original_index])


def test_same_seed_same_result_different_seed_differs(samples):
    augment = ssd_augmentation()

    def outputs(seed):
        torch.manual_seed(seed)
        return [_run(augment, sample) for sample in samples]

    first, second, other = outputs(7), outputs(7), outputs(8)
    for a, b in zip(first, second, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(a[0], c[0]) for a, c in zip(first, other, strict=True))


def test_image_without_boxes_is_augmented():
    image = torch.full((3, 16, 16), 100, dtype=torch.uint8)
    torch.manual_seed(0)
    out = ssd_augmentation()(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool))
    assert out[0].shape[0] == 3 and out[1].shape == (0, 4) and out[2].shape == (0,)


def test_bad_fill_raises():
    with pytest.raises(ValueError, match="fill"):
        ssd_augmentation(fill=(1.0, 2.0))


def test_the_flip_preset_keeps_every_object_whole_and_the_image_size(samples):
    torch.manual_seed(0)
    augment = ssd_augmentation(config=AUGMENTATIONS["flip"])
    for sample in samples * 4:
        image, boxes, labels, difficult = _run(augment, sample)
        assert image.shape == sample.image.shape
        assert torch.equal(labels, sample.labels) and torch.equal(difficult, sample.difficult)
        width = sample.image.shape[-1]
        x1, y1, x2, y2 = sample.boxes.unbind(dim=1)
        mirrored = torch.stack((width - x2, y1, width - x1, y2), dim=1)
        assert torch.allclose(boxes, sample.boxes) or torch.allclose(boxes, mirrored)
