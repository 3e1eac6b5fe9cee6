"""A deterministic synthetic detection data set: flat-coloured shapes on textured backgrounds.

Each image is a function of (seed, split, index) only, so any sample can be regenerated anywhere
(tests, benchmarks, demos, a held-out split) without storing files. Shapes are rasterised by pixel
centre with vectorised torch ops; each box is the exact bounding box of the pixels drawn for its
shape, in (x1, y1, x2, y2) pixels (x2, y2 exclusive: a shape covering columns 3..7 has x1=3, x2=8).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ssd_core.data.datasets import Sample

__all__ = ["CLASS_NAMES", "ShapesDataset"]

CLASS_NAMES: tuple[str, ...] = ("rectangle", "ellipse", "triangle")
RECTANGLE, ELLIPSE, TRIANGLE = range(3)


@dataclass(frozen=True)
class _Placement:
    label: int
    x1: float
    y1: float
    x2: float
    y2: float


class ShapesDataset(torch.utils.data.Dataset):
    """Rectangles, ellipses and triangles of random colour and size with exact boxes.

    Args:
        num_images: length of the data set.
        image_size: side of the square images in pixels.
        seed: base seed; together with `split` and the index it fixes every pixel.
        min_objects, max_objects: objects per image (fewer than drawn only if no place respects
            `max_overlap` after several tries).
        min_size, max_size: object side as a fraction of the image side (the other side follows from
            an aspect ratio in [1/2, 2], clamped to the same range).
        max_overlap: largest intersection between two objects' boxes, as a fraction of the smaller box.
        split: name of the split (e.g. ``"train"``, ``"val"``): different splits give different images.

    `ds[i]` is a `Sample` (image [3, S, S] uint8, boxes [N, 4] pixel xyxy, labels [N] in
    0..2 = `CLASS_NAMES`, difficult [N] all False); `num_classes` counts background too (4).
    """

    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES) + 1

    def __init__(
        self,
        num_images: int,
        image_size: int = 256,
        seed: int = 0,
        min_objects: int = 1,
        max_objects: int = 4,
        *,
        min_size: float = 0.1,
        max_size: float = 0.7,
        max_overlap: float = 0.2,
        split: str = "train",
    ) -> None:
        if num_images < 0 or image_size < 8:
            raise ValueError(f"need num_images >= 0 and image_size >= 8, got {num_images}, {image_size}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if not 0 < min_size <= max_size <= 1:
            raise ValueError(f"need 0 < min_size <= max_size <= 1, got {min_size}, {max_size}")
        self.num_images = num_images
        self.image_size = image_size
        self.seed = seed
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.min_size = min_size
        self.max_size = max_size
        self.max_overlap = max_overlap
        self.split = split
        centres = torch.arange(image_size, dtype=torch.float32) + 0.5
        self._xs = centres[None, :]  # [1, S] pixel-centre x
        self._ys = centres[:, None]  # [S, 1] pixel-centre y

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Sample:
        return self.render(index)[0]

    def render(self, index: int) -> tuple[Sample, Tensor]:
        """Draw image `index` and return it with the pixel mask of every shape.

        Returns:
            (sample, masks): masks (Tensor[N, S, S] bool), the pixels drawn for each shape, in the
            order drawn (later shapes may cover parts of earlier ones).
        """
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        generator = torch.Generator().manual_seed(self._sample_seed(index))
        background = self._background(generator)  # [3, S, S] float
        image = background.round().clamp(0, 255).to(torch.uint8)
        placements = self._place_objects(generator)
        size = self.image_size
        masks = torch.zeros(len(placements), size, size, dtype=torch.bool)  # [N, S, S]
        for k, placement in enumerate(placements):
            # Only pixels whose centre lies in [x1, x2] x [y1, y2] can be inside: work on that crop.
            rows = slice(int(placement.y1), math.ceil(placement.y2))
            cols = slice(int(placement.x1), math.ceil(placement.x2))
            mask = self._shape_mask(placement, generator, self._xs[:, cols], self._ys[rows])  # [h, w]
            colour = self._colour(background, placement, generator)  # [3] uint8
            masks[k, rows, cols] = mask
            image[:, rows, cols] = torch.where(mask, colour[:, None, None], image[:, rows, cols])
        drawn = masks.flatten(1).any(dim=1)  # [N]; tiny shapes may cover no pixel centre
        masks = masks[drawn]
        labels = torch.tensor([p.label for p in placements], dtype=torch.int64)[drawn]
        boxes = self._mask_boxes(masks)  # [N, 4]
        sample = Sample(image, boxes, labels, torch.zeros(len(labels), dtype=torch.bool))
        return sample, masks

    def _sample_seed(self, index: int) -> int:
        split_code = zlib.crc32(self.split.encode())
        return int(np.random.SeedSequence([self.seed, split_code, index]).generate_state(1)[0])

    def _uniform(self, generator: torch.Generator, low: float, high: float, n: int = 1) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    def _background(self, generator: torch.Generator) -> Tensor:
        """Linear colour gradient + sinusoidal stripes + Gaussian noise, Tensor[3, S, S] float."""
        size = self.image_size
        start, end = self._uniform(generator, 30.0, 225.0, 6).view(2, 3, 1, 1)
        angle, stripe_angle, phase = self._uniform(generator, 0.0, 2 * math.pi, 3).tolist()
        along = self._xs * math.cos(angle) + self._ys * math.sin(angle)  # [S, S]
        along = (along - along.min()) / (along.max() - along.min())
        period = float(self._uniform(generator, size / 24, size / 6))
        amplitude = self._uniform(generator, 0.0, 25.0, 3).view(3, 1, 1)
        across = self._xs * math.cos(stripe_angle) + self._ys * math.sin(stripe_angle)  # [S, S]
        stripes = torch.sin(across * (2 * math.pi / period) + phase)  # [S, S]
        noise_std = float(self._uniform(generator, 2.0, 12.0))
        noise = torch.randn(3, size, size, generator=generator) * noise_std
        return start + (end - start) * along + amplitude * stripes + noise

    def _place_objects(self, generator: torch.Generator) -> list[_Placement]:
        """Random class, size and position; rejects places overlapping earlier boxes too much."""
        size = self.image_size
        count = int(torch.randint(self.min_objects, self.max_objects + 1, (1,), generator=generator))
        placed: list[_Placement] = []
        for _ in range(10 * count):
            if len(placed) == count:
                break
            label = int(torch.randint(len(CLASS_NAMES), (1,), generator=generator))
            width = float(self._uniform(generator, self.min_size, self.max_size)) * size
            aspect = math.exp(float(self._uniform(generator, -math.log(2), math.log(2))))
            height = min(max(width * aspect, self.min_size * size), self.max_size * size)
            x1 = float(self._uniform(generator, 0.0, size - width))
            y1 = float(self._uniform(generator, 0.0, size - height))
            candidate = _Placement(label, x1, y1, x1 + width, y1 + height)
            if all(self._overlap(candidate, other) <= self.max_overlap for other in placed):
                placed.append(candidate)
        return placed

    @staticmethod
    def _overlap(a: _Placement, b: _Placement) -> float:
        inter_w = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
        inter_h = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
        smaller = min((a.x2 - a.x1) * (a.y2 - a.y1), (b.x2 - b.x1) * (b.y2 - b.y1))
        return inter_w * inter_h / smaller

    def _shape_mask(self, p: _Placement, generator: torch.Generator, xs: Tensor, ys: Tensor) -> Tensor:
        """Pixels whose centre lies inside the shape, Tensor[h, w] bool for centres xs [1, w], ys [h, 1]."""
        if p.label == RECTANGLE:
            return (xs >= p.x1) & (xs <= p.x2) & (ys >= p.y1) & (ys <= p.y2)
        if p.label == ELLIPSE:
            cx, cy, rx, ry = (p.x1 + p.x2) / 2, (p.y1 + p.y2) / 2, (p.x2 - p.x1) / 2, (p.y2 - p.y1) / 2
            return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
        return self._triangle_mask(self._triangle_vertices(p, generator), xs, ys)

    def _triangle_vertices(self, p: _Placement, generator: torch.Generator) -> list[tuple[float, float]]:
        """Apex on one side of the box, base on the opposite side's corners: the box is its bbox."""
        side = int(torch.randint(4, (1,), generator=generator))
        t = float(self._uniform(generator, 0.2, 0.8))
        ax, ay = p.x1 + t * (p.x2 - p.x1), p.y1 + t * (p.y2 - p.y1)
        if side == 0:  # apex on top
            return [(ax, p.y1), (p.x1, p.y2), (p.x2, p.y2)]
        if side == 1:  # apex at the bottom
            return [(ax, p.y2), (p.x1, p.y1), (p.x2, p.y1)]
        if side == 2:  # apex on the left
            return [(p.x1, ay), (p.x2, p.y1), (p.x2, p.y2)]
        return [(p.x2, ay), (p.x1, p.y1), (p.x1, p.y2)]  # apex on the right

    @staticmethod
    def _triangle_mask(vertices: list[tuple[float, float]], xs: Tensor, ys: Tensor) -> Tensor:
        # A point is inside when the three edge functions (cross products) share a sign.
        signs = []
        for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1], strict=True):
            signs.append((x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0))  # [h, w]
        edges = torch.stack(signs)  # [3, h, w]
        return (edges >= 0).all(dim=0) | (edges <= 0).all(dim=0)

    def _colour(self, background: Tensor, p: _Placement, generator: torch.Generator) -> Tensor:
        """A random colour that stands out from the background at the shape's centre, Tensor[3] uint8."""
        cy = min(int((p.y1 + p.y2) / 2), self.image_size - 1)
        cx = min(int((p.x1 + p.x2) / 2), self.image_size - 1)
        local = background[:, cy, cx]  # [3]
        colour = torch.rand(3, generator=generator) * 255
        for _ in range(8):
            if (colour - local).abs().sum() >= 120:
                break
            colour = torch.rand(3, generator=generator) * 255
        return colour.round().to(torch.uint8)

    @staticmethod
    def _mask_boxes(masks: Tensor) -> Tensor:
        """Tight pixel boxes of masks [N, S, S] -> Tensor[N, 4] float32 (x1, y1, x2, y2), x2/y2 exclusive."""
        columns = torch.arange(masks.shape[-1])
        rows = torch.arange(masks.shape[-2])
        any_col = masks.any(dim=1)  # [N, S] columns touched
        any_row = masks.any(dim=2)  # [N, S] rows touched
        big = masks.shape[-1] + masks.shape[-2]
        x1 = torch.where(any_col, columns, big).amin(dim=1)
        x2 = torch.where(any_col, columns, -1).amax(dim=1) + 1
        y1 = torch.where(any_row, rows, big).amin(dim=1)
        y2 = torch.where(any_row, rows, -1).amax(dim=1) + 1
        return torch.stack((x1, y1, x2, y2), dim=1).to(torch.float32)
