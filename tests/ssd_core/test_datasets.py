"""Samples, batch collation and the VOC / COCO readers on tiny data sets written by the tests."""

from dataclasses import dataclass

import torch

from ssd_core.datasets import Sample, collate
from ssd_core.images import to_model_input

MEAN, STD = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)


@dataclass(frozen=True)
class _Spec:
    image_size: int = 32
    pixel_mean: tuple[float, ...] = MEAN
    pixel_std: tuple[float, ...] = STD


def _sample(height, width, boxes, labels, difficult, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return Sample(
        image=torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator),
        boxes=torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64),
        difficult=torch.tensor(difficult, dtype=torch.bool),
    )


def test_collate_builds_images_and_normalised_targets():
    samples = [
        _sample(40, 80, [[8, 4, 40, 20], [60, 30, 90, 50]], [2, 0], [False, True], seed=1),
        _sample(20, 20, [], [], [], seed=2),
    ]
    images, targets = collate(samples, _Spec())
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    torch.testing.assert_close(images[0], to_model_input(samples[0].image, 32, MEAN, STD))
    expected = torch.tensor([[0.1, 0.1, 0.5, 0.5, 2.0, 0.0], [0.75, 0.75, 1.0, 1.0, 0.0, 1.0]])
    torch.testing.assert_close(targets[0], expected)
    assert targets[1].shape == (0, 6)


def test_collate_accepts_a_size_mean_std_tuple_and_drops_empty_boxes():
    sample = _sample(10, 10, [[1, 1, 5, 5], [12, 0, 15, 5], [3, 3, 3, 8]], [0, 1, 2], [False] * 3)
    images, targets = collate([sample], (16, MEAN, STD))
    assert images.shape == (1, 3, 16, 16)
    torch.testing.assert_close(targets[0], torch.tensor([[0.1, 0.1, 0.5, 0.5, 0.0, 0.0]]))


def test_collate_applies_the_augmentation_to_every_sample():
    calls = []

    def mirror(image, boxes, labels, difficult):
        calls.append(len(labels))
        width = image.shape[-1]
        mirrored = torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)
        return image.flip(-1), mirrored, labels, difficult

    sample = _sample(10, 20, [[2, 1, 6, 5]], [1], [False])
    images, targets = collate([sample, sample], (16, MEAN, STD), augment=mirror)
    assert calls == [1, 1]
    torch.testing.assert_close(images[0], to_model_input(sample.image.flip(-1), 16, MEAN, STD))
    torch.testing.assert_close(targets[1], torch.tensor([[0.7, 0.1, 0.9, 0.5, 1.0, 0.0]]))

