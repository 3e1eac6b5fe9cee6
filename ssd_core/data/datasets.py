"""Detection samples, data set readers (Pascal VOC, COCO) and batch collation.

A `Sample` holds one image with its boxes in *pixel* point form (x1, y1, x2, y2); `collate` turns
samples into the network's input batch and the loss's targets with *normalised* boxes.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from ssd_core.data.images import decode_image_bytes, to_model_input
from ssd_core.ops.box_formats import to_normalised_xyxy, xywh_to_xyxy

__all__ = ["VOC_CLASSES", "Augment", "CocoDataset", "InputSpec", "Sample", "VOCDataset", "collate"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
# Readers accept large photos but still refuse decompression bombs.
DEFAULT_MAX_PIXELS = 100_000_000


@dataclass
class Sample:
    """One annotated image.

    Attributes:
        image (Tensor[3, H, W] uint8): RGB image.
        boxes (Tensor[N, 4] float32): objects in (x1, y1, x2, y2) pixels.
        labels (Tensor[N] int64): 0-based object classes (background not counted).
        difficult (Tensor[N] bool): objects to ignore in matching/evaluation (VOC difficult, COCO crowd).
        labelled_classes: partial labels: the 0-based classes the boxes are complete for (every box's
            label among them; see `ssd_core.loss.partial_labels`), or None when labelled for every class.
    """

    image: Tensor
    boxes: Tensor
    labels: Tensor
    difficult: Tensor
    labelled_classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.image.dim() != 3 or self.image.shape[0] != 3:
            raise ValueError(f"Sample.image must have shape [3, H, W], got {tuple(self.image.shape)}")
        if self.boxes.dim() != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"Sample.boxes must have shape [N, 4], got {tuple(self.boxes.shape)}")
        n = self.boxes.shape[0]
        for name in ("labels", "difficult"):
            if getattr(self, name).shape != (n,):
                raise ValueError(
                    f"Sample.{name} must have shape [{n}] to match {n} boxes, "
                    f"got {tuple(getattr(self, name).shape)}"
                )


def _read_image(path: Path, max_pixels: int) -> Tensor:
    return decode_image_bytes(path.read_bytes(), max_pixels)  # [3, H, W]


class VOCDataset(torch.utils.data.Dataset):
    """A Pascal VOC directory: ``Annotations/<id>.xml``, ``ImageSets/Main/<split>.txt``, ``JPEGImages/<id>.jpg``.

    VOC coordinates are 1-based inclusive pixels; like ssd.pytorch, 1 is subtracted from all four.

    Args:
        root: the ``VOC2007``-style directory.
        split: name of the image list in ``ImageSets/Main`` (``train``, ``val``, ``trainval``, ``test``).
        class_names: object classes; label i is ``class_names[i]`` (background not counted).
        keep_difficult: keep objects marked ``<difficult>1</difficult>`` (flagged in `Sample.difficult`).
        max_pixels: decompression-bomb limit for each image.

    `ds[i]` is a `Sample` (boxes [N, 4] pixel (x1, y1, x2, y2) float32, labels [N] int64 0-based).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "trainval",
        class_names: Sequence[str] = VOC_CLASSES,
        keep_difficult: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.class_names = tuple(class_names)
        self.keep_difficult = keep_difficult
        self.max_pixels = max_pixels
        self._label_of = {name: label for label, name in enumerate(self.class_names)}
        image_list = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not image_list.is_file():
            raise ValueError(f"split {split!r}: no image list at {image_list}")
        self.ids = [line.strip() for line in image_list.read_text().splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        image_id = self.ids[index]
        boxes, labels, difficult = self.annotation(image_id)
        image = _read_image(self.root / "JPEGImages" / f"{image_id}.jpg", self.max_pixels)
        return Sample(image, boxes, labels, difficult)

    def annotation(self, image_id: str) -> tuple[Tensor, Tensor, Tensor]:
        """Parse ``Annotations/<image_id>.xml``.

        Returns:
            boxes (Tensor[N, 4] float32) pixel (x1, y1, x2, y2), labels (Tensor[N] int64),
            difficult (Tensor[N] bool).
        """
        path = self.root / "Annotations" / f"{image_id}.xml"
        boxes, labels, difficult = [], [], []
        for obj in ET.parse(path).getroot().iter("object"):
            is_difficult = (obj.findtext("difficult") or "0").strip() == "1"
            if is_difficult and not self.keep_difficult:
                continue
            name = (obj.findtext("name") or "").strip().lower()
            if name not in self._label_of:
                raise ValueError(f"{path}: unknown class name {name!r}; expected one of {self.class_names}")
            corners = [obj.findtext(f"bndbox/{key}") for key in ("xmin", "ymin", "xmax", "ymax")]
            if None in corners:
                raise ValueError(f"{path}: object {name!r} needs <bndbox> with xmin, ymin, xmax, ymax")
            boxes.append([float(value) - 1 for value in corners])
            labels.append(self._label_of[name])
            difficult.append(is_difficult)
        return (
            torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
            torch.tensor(labels, dtype=torch.int64),
            torch.tensor(difficult, dtype=torch.bool),
        )


class CocoDataset(torch.utils.data.Dataset):
    """Images of a directory annotated by a COCO JSON file (``images``, ``annotations``, ``categories``).

    Category ids are mapped to contiguous 0-based labels in increasing id order (`class_names` in that
    order); ``bbox`` (x, y, w, h) becomes (x1, y1, x2, y2); crowd regions (``iscrowd``) are flagged
    difficult; boxes with no area are skipped. Every listed image is a sample, with or without objects.

    Args:
        image_dir: directory holding the ``file_name`` of each image.
        annotation_file: the COCO JSON file.
        max_pixels: decompression-bomb limit for each image.

    `ds[i]` is a `Sample` (boxes [N, 4] pixel (x1, y1, x2, y2) float32, labels [N] int64 0-based).
    """

    def __init__(self, image_dir: str | Path, annotation_file: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.image_dir = Path(image_dir)
        self.max_pixels = max_pixels
        coco = json.loads(Path(annotation_file).read_text())
        categories = sorted(coco["categories"], key=lambda category: category["id"])
        self.category_ids = tuple(category["id"] for category in categories)
        self.class_names = tuple(category["name"] for category in categories)
        label_of = {category_id: label for label, category_id in enumerate(self.category_ids)}
        self.images = sorted(coco["images"], key=lambda image: image["id"])
        objects: dict[int, list[dict]] = {image["id"]: [] for image in self.images}
        for annotation in coco["annotations"]:
            if annotation["image_id"] not in objects:
                raise ValueError(f"annotation {annotation.get('id')} refers to unknown image {annotation['image_id']}")
            if annotation["category_id"] not in label_of:
                raise ValueError(
                    f"annotation {annotation.get('id')} has unknown category_id {annotation['category_id']}"
                )
            objects[annotation["image_id"]].append(annotation)
        self._targets = [self._image_targets(objects[image["id"]], label_of) for image in self.images]

    @staticmethod
    def _image_targets(annotations: list[dict], label_of: dict[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        xywh = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).view(-1, 4)  # [N, 4]
        has_area = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)  # [N]
        labels = torch.tensor([label_of[a["category_id"]] for a in annotations], dtype=torch.int64)
        crowd = torch.tensor([bool(a.get("iscrowd", 0)) for a in annotations], dtype=torch.bool)
        return xywh_to_xyxy(xywh[has_area]), labels[has_area], crowd[has_area]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        boxes, labels, difficult = self._targets[index]
        image = _read_image(self.image_dir / self.images[index]["file_name"], self.max_pixels)
        return Sample(image, boxes.clone(), labels.clone(), difficult.clone())


class InputSpec(Protocol):
    """What `collate` needs from a model's `ModelSpec`: input side and 0-255 RGB mean/std."""

    image_size: int
    pixel_mean: Sequence[float]
    pixel_std: Sequence[float]


# (image [3,H,W] uint8, boxes [N,4] pixel xyxy, labels [N], difficult [N]) -> the same, transformed.
Augment = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


def _input_geometry(spec: InputSpec | tuple[int, Sequence[float], Sequence[float]]):
    if isinstance(spec, tuple):
        return spec
    return spec.image_size, spec.pixel_mean, spec.pixel_std


def collate(
    samples: Sequence[Sample],
    spec: InputSpec | tuple[int, Sequence[float], Sequence[float]],
    augment: Augment | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Build a training/evaluation batch: augment, resize, normalise, convert boxes.

    Boxes that have no area left inside the image are dropped (with their labels and flags).

    Args:
        samples: B samples with pixel (x1, y1, x2, y2) boxes.
        spec: the model's `spec` (`image_size`, `pixel_mean`, `pixel_std` in 0-255 RGB units) or a
            tuple `(size, mean, std)`.
        augment: optional `Augment` (e.g. `ssd_augmentation()`), applied to each sample first.

    Returns:
        (images, targets): images (Tensor[B, 3, S, S] float32); targets, one Tensor[n_i, 6] float32
        per image with columns x1, y1, x2, y2 (normalised), label (0-based), difficult (0 or 1).
    """
    size, mean, std = _input_geometry(spec)
    images, targets = [], []
    for sample in samples:
        image, boxes, labels, difficult = sample.image, sample.boxes, sample.labels, sample.difficult
        if augment is not None:
            image, boxes, labels, difficult = augment(image, boxes, labels, difficult)
        normalised, keep = to_normalised_xyxy(boxes, "xyxy", (image.shape[-2], image.shape[-1]))  # [N, 4]
        target = torch.cat(
            (normalised[keep], labels[keep, None].float(), difficult[keep, None].float()), dim=1
        )  # [n_i, 6]
        images.append(to_model_input(image, size, mean, std))  # [3, S, S]
        targets.append(target)
    return torch.stack(images), targets
