"""Samples, batch collation and the VOC / COCO readers on tiny data sets written by the tests."""

import json
from dataclasses import dataclass

import pytest
import torch

from ssd_core.data.augment import ssd_augmentation
from ssd_core.data.datasets import VOC_CLASSES, CocoDataset, Sample, VOCDataset, collate
from ssd_core.data.images import decode_image_bytes, encode_jpeg, encode_png, to_model_input
from ssd_core.data.synthetic import ShapesDataset

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



def _write_voc(root, images, objects_by_id, split_ids):
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    (root / "ImageSets/Main/trainval.txt").write_text("\n".join(split_ids) + "\n")
    for image_id, image in images.items():
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(encode_jpeg(image))
        objects = "".join(
            f"<object><name> {name} </name><pose>Left</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for name, (x1, y1, x2, y2), difficult in objects_by_id[image_id]
        )
        height, width = image.shape[-2:]
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{objects}</annotation>"
        )


@pytest.fixture
def voc_root(tmp_path):
    images = {"000001": _image(40, 60, 1), "000002": _image(30, 30, 2), "000003": _image(20, 20, 3)}
    objects = {
        "000001": [("dog", (5, 10, 40, 35), False), ("Person", (20, 1, 60, 40), True)],
        "000002": [("tvmonitor", (1, 1, 30, 30), False)],
        "000003": [("cat", (2, 2, 5, 5), False)],
    }
    _write_voc(tmp_path, images, objects, ["000001", "000002"])
    return tmp_path, images


def _image(height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def test_voc_reader_boxes_labels_and_difficult(voc_root):
    root, images = voc_root
    dataset = VOCDataset(root)
    assert len(dataset) == 2 and dataset.ids == ["000001", "000002"]
    first = dataset[0]
    assert first.image.shape == (3, 40, 60) and first.image.dtype == torch.uint8
    assert torch.equal(first.image, decode_image_bytes(encode_jpeg(images["000001"]), 10_000))
    torch.testing.assert_close(first.boxes, torch.tensor([[4.0, 9.0, 39.0, 34.0], [19.0, 0.0, 59.0, 39.0]]))
    assert first.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert first.difficult.tolist() == [False, True]
    second = dataset[1]
    torch.testing.assert_close(second.boxes, torch.tensor([[0.0, 0.0, 29.0, 29.0]]))
    assert second.labels.tolist() == [19]


def test_voc_reader_can_drop_difficult_and_use_own_classes(voc_root):
    root, _ = voc_root
    dataset = VOCDataset(root, keep_difficult=False, class_names=("dog", "person", "tvmonitor"))
    sample = dataset[0]
    assert sample.labels.tolist() == [0] and sample.difficult.tolist() == [False]
    assert dataset[1].labels.tolist() == [2]


def test_voc_reader_errors_name_the_problem(voc_root):
    root, _ = voc_root
    with pytest.raises(ValueError, match="'cat'"):
        VOCDataset(root, class_names=("dog", "person", "tvmonitor"), split="trainval").annotation("000003")
    with pytest.raises(ValueError, match="'test'"):
        VOCDataset(root, split="test")
    (root / "Annotations/000003.xml").write_text(
        "<annotation><object><name>cat</name><bndbox><xmin>1</xmin></bndbox></object></annotation>"
    )
    with pytest.raises(ValueError, match=r"000003\.xml: object 'cat' needs <bndbox>"):
        VOCDataset(root).annotation("000003")


def test_voc_samples_collate_into_a_batch(voc_root):
    root, _ = voc_root
    dataset = VOCDataset(root)
    _, targets = collate([dataset[0], dataset[1]], (16, MEAN, STD))
    torch.testing.assert_close(targets[0][0], torch.tensor([4 / 60, 9 / 40, 39 / 60, 34 / 40, 11.0, 0.0]))
    assert targets[0][1, 5] == 1.0


@pytest.fixture
def coco_files(tmp_path):
    images = {"a.png": _image(20, 40, 4), "b.jpg": _image(30, 30, 5), "c.png": _image(10, 10, 6)}
    for name, image in images.items():
        (tmp_path / name).write_bytes(encode_png(image) if name.endswith(".png") else encode_jpeg(image))
    coco = {
        "images": [
            {"id": 7, "file_name": "b.jpg", "width": 30, "height": 30},
            {"id": 3, "file_name": "a.png", "width": 40, "height": 20},
            {"id": 9, "file_name": "c.png", "width": 10, "height": 10},
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 5, "name": "bus"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 18, "bbox": [2.5, 3, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 1, "bbox": [0, 0, 40, 20], "iscrowd": 1},
            {"id": 3, "image_id": 7, "category_id": 5, "bbox": [4, 4, 6, 8]},
            {"id": 4, "image_id": 7, "category_id": 5, "bbox": [4, 4, 0, 8]},  # no area: skipped
        ],
    }
    annotation_file = tmp_path / "instances.json"
    annotation_file.write_text(json.dumps(coco))
    return tmp_path, annotation_file, images, coco


def test_coco_reader_converts_boxes_and_maps_categories(coco_files):
    image_dir, annotation_file, images, _ = coco_files
    dataset = CocoDataset(image_dir, annotation_file)
    assert len(dataset) == 3
    assert dataset.class_names == ("person", "bus", "dog")  # ids 1, 5, 18
    first = dataset[0]  # image id 3 = a.png
    assert torch.equal(first.image, images["a.png"])
    torch.testing.assert_close(first.boxes, torch.tensor([[2.5, 3.0, 12.5, 8.0], [0.0, 0.0, 40.0, 20.0]]))
    assert first.labels.tolist() == [2, 0] and first.difficult.tolist() == [False, True]
    second = dataset[1]  # image id 7 = b.jpg
    assert second.image.shape == (3, 30, 30)
    torch.testing.assert_close(second.boxes, torch.tensor([[4.0, 4.0, 10.0, 12.0]]))
    assert second.labels.tolist() == [1] and second.difficult.tolist() == [False]
    empty = dataset[2]
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)


def test_coco_reader_rejects_unknown_references(coco_files):
    image_dir, annotation_file, _, coco = coco_files
    coco["annotations"].append({"id": 99, "image_id": 3, "category_id": 2, "bbox": [0, 0, 1, 1]})
    annotation_file.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="annotation 99 has unknown category_id 2"):
        CocoDataset(image_dir, annotation_file)
    coco["annotations"][-1] = {"id": 98, "image_id": 42, "category_id": 1, "bbox": [0, 0, 1, 1]}
    annotation_file.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="unknown image 42"):
        CocoDataset(image_dir, annotation_file)


@pytest.mark.parametrize(
    ("image", "boxes", "labels", "difficult", "message"),
    [
        ((1, 8, 8), (2, 4), (2,), (2,), r"Sample.image .*\[3, H, W\]"),
        ((3, 8, 8), (2, 5), (2,), (2,), r"Sample.boxes .*\[N, 4\]"),
        ((3, 8, 8), (2, 4), (3,), (2,), r"Sample.labels .*\[2\]"),
        ((3, 8, 8), (2, 4), (2,), (2, 1), r"Sample.difficult .*\[2\]"),
    ],
)
def test_sample_rejects_misaligned_fields(image, boxes, labels, difficult, message):
    with pytest.raises(ValueError, match=message):
        Sample(
            torch.zeros(image, dtype=torch.uint8),
            torch.zeros(boxes),
            torch.zeros(labels, dtype=torch.int64),
            torch.zeros(difficult, dtype=torch.bool),
        )


def test_collate_with_ssd_augmentation_gives_valid_targets():
    dataset = ShapesDataset(6, image_size=48, seed=9)
    torch.manual_seed(0)
    images, targets = collate(list(dataset), _Spec(), augment=ssd_augmentation(fill=MEAN))
    assert images.shape == (6, 3, 32, 32) and torch.isfinite(images).all()
    for sample, target in zip(dataset, targets, strict=True):
        assert target.shape[1] == 6 and len(target) <= len(sample.labels)
        assert (target[:, :4] >= 0).all() and (target[:, :4] <= 1).all()
        assert (target[:, 2] > target[:, 0]).all() and (target[:, 3] > target[:, 1]).all()
        assert set(target[:, 4].long().tolist()) <= set(sample.labels.tolist())
        assert (target[:, 5] == 0).all()
