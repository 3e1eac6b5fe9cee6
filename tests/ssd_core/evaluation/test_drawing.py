"""Detections drawn on their image: each class in its own colour, the same in `ssd detect` and /detect."""

from __future__ import annotations

import pytest
import torch
from PIL import ImageColor

from ssd_core.data.images import decode_image_bytes
from ssd_core.evaluation.drawing import CLASS_COLOURS, class_colour, draw_detections


def _rgb(colour: str) -> list[int]:
    return list(ImageColor.getrgb(colour))


def test_each_class_is_drawn_in_its_own_colour():
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    boxes = torch.tensor([[4.0, 4.0, 28.0, 28.0], [36.0, 36.0, 60.0, 60.0], [4.0, 36.0, 28.0, 60.0]])
    png = draw_detections(image, boxes, ["rectangle 0.9", "ellipse 0.8", "rectangle 0.7"], [0, 1, 0])
    drawn = decode_image_bytes(png, 64 * 64)
    left_edges = [drawn[:, 20, 4].tolist(), drawn[:, 50, 36].tolist(), drawn[:, 50, 4].tolist()]  # [3] RGB
    assert left_edges == [_rgb(class_colour(0)), _rgb(class_colour(1)), _rgb(class_colour(0))]
    assert class_colour(0) != class_colour(1)


def test_the_palette_has_distinct_colours_and_repeats_past_its_end():
    assert len(set(CLASS_COLOURS)) == len(CLASS_COLOURS) == 20
    assert class_colour(20) == class_colour(0) and class_colour(21) == class_colour(1)


def test_captions_and_classes_must_match_the_boxes():
    with pytest.raises(ValueError, match="2 captions and 1 classes for 2 boxes"):
        draw_detections(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(2, 4), ["a", "b"], [0])
