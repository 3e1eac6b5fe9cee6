"""User box formats: conversion, clipping, dropping and strict validation."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssd_core.ops.box_formats import check_pixel_boxes, to_normalised_xyxy


def test_pixel_xyxy_is_divided_by_width_and_height():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0]])
    out, keep = to_normalised_xyxy(boxes, "xyxy", (100, 200))  # height 100, width 200
    torch.testing.assert_close(out, torch.tensor([[0.05, 0.2, 0.25, 0.8]]))
    assert keep.tolist() == [True] and out.dtype == torch.float32


def test_coco_xywh_becomes_corners():
    boxes = torch.tensor([[10, 20, 40, 60]])  # integer input is accepted too
    out, _ = to_normalised_xyxy(boxes, "xywh", (100, 200))
    torch.testing.assert_close(out, torch.tensor([[0.05, 0.2, 0.25, 0.8]]))


def test_normalised_boxes_pass_through():
    boxes = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    out, keep = to_normalised_xyxy(boxes, "xyxy_norm", (7, 9))
    torch.testing.assert_close(out, boxes.float())
    assert keep.all()


def test_boxes_are_clipped_and_empty_ones_dropped():
    boxes = torch.tensor(
        [
            [-10.0, -10.0, 50.0, 50.0],  # clipped at the top-left
            [150.0, 80.0, 300.0, 120.0],  # clipped at the bottom-right
            [210.0, 10.0, 250.0, 30.0],  # entirely right of the image: empty after clipping
            [20.0, 20.0, 20.0, 40.0],  # zero width
            [30.0, 40.0, 10.0, 60.0],  # x2 < x1
        ]
    )
    out, keep = to_normalised_xyxy(boxes, "xyxy", (100, 200))
    assert keep.tolist() == [True, True, False, False, False]
    assert int((~keep).sum()) == 3
    torch.testing.assert_close(out[keep], torch.tensor([[0.0, 0.0, 0.25, 0.5], [0.75, 0.8, 1.0, 1.0]]))
    assert out.shape == (5, 4) and (out >= 0).all() and (out <= 1).all()


def test_empty_input_gives_empty_output():
    out, keep = to_normalised_xyxy(torch.zeros(0, 4), "xywh", (10, 10))
    assert out.shape == (0, 4) and keep.shape == (0,)


@pytest.mark.parametrize(
    ("boxes", "fmt", "message"),
    [
        (torch.zeros(3), "xyxy", r"shape \[N, 4\]"),
        (torch.zeros(2, 5), "xyxy", r"shape \[N, 4\]"),
        (torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, math.nan, 1.0, 1.0]]), "xyxy", r"boxes\[1\].*NaN"),
        (torch.tensor([[0.0, 0.0, math.inf, 1.0]]), "xyxy", r"boxes\[0\]"),
        (torch.zeros(1, 4), "cxcywh", "unknown box format 'cxcywh'"),
    ],
)
def test_bad_input_raises_value_error(boxes, fmt, message):
    with pytest.raises(ValueError, match=message):
        to_normalised_xyxy(boxes, fmt, (10, 10))


def test_non_positive_image_size_raises():
    with pytest.raises(ValueError, match="image_hw"):
        to_normalised_xyxy(torch.zeros(1, 4), "xyxy", (0, 10))


def test_strict_check_accepts_boxes_within_the_tolerance():
    check_pixel_boxes(torch.tensor([[0.0, 0.0, 5.0, 5.0], [-1.0, 8.0, 4.0, 11.0], [3.0, 3.0, 4.0, 4.0]]), (10, 10))
    check_pixel_boxes(torch.tensor([[-3.0, 8.0, 4.0, 12.0]]), (10, 10), tolerance=None)  # any overhang allowed
    check_pixel_boxes(torch.tensor([[0.1, 0.1, 0.5, 0.5]]), (1, 1), min_size=0.0)  # normalised boxes


def _slow_problem(box, height, width, min_size=1.0, tolerance=1.0):
    """The rules one box at a time, written out: the first that fails, or None."""
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        return "x2 > x1"
    if x2 - x1 < min_size or y2 - y1 < min_size:
        return "px wide or high"
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        return "entirely outside"
    if max(-x1, -y1, x2 - width, y2 - height) > tolerance:
        return "beyond"
    return None


def test_strict_check_matches_a_per_box_reference():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        box = (torch.rand(4, generator=generator) * 16 - 3).tolist()
        box = [round(v * 2) / 2 for v in box]  # half pixels: hit the exact 1 px edges
        expected = _slow_problem(box, 10, 12)
        if expected is None:
            check_pixel_boxes(torch.tensor([box]), (10, 12))
        else:
            with pytest.raises(ValueError, match=expected):
                check_pixel_boxes(torch.tensor([box]), (10, 12))


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([5.0, 1.0, 5.0, 4.0], "x2 > x1"),
        ([1.0, 6.0, 4.0, 2.0], "y2 > y1"),
        ([10.0, 1.0, 14.0, 4.0], "entirely outside the 10x10 image"),
        ([0.1, 0.1, 0.5, 0.5], r"0.4x0.4 px, under 1 px .*normalised coordinates\? multiply x by 10"),
        ([2.0, 2.0, 2.5, 6.0], "0.5x4 px"),
        ([-2.0, 1.0, 4.0, 4.0], r"reaches 2 px beyond the 10x10 image \(more than the 1 px clipped\)"),
        ([1.0, 1.0, 4.0, 11.5], "reaches 1.5 px beyond"),
        ([1.0, -9.0, 4.0, 0.0], "entirely outside"),
        ([1.0, math.nan, 4.0, 2.0], "NaN"),
    ],
)
def test_strict_check_names_the_offending_box(box, message):
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], box])
    with pytest.raises(ValueError, match=rf"truth\[1\].*{message}"):
        check_pixel_boxes(boxes, (10, 10), name="truth")


def _reference(box, fmt, height, width):
    """Slow per-box conversion written out by hand: (normalised clipped xyxy, kept)."""
    x1, y1, a, b = box
    x2, y2 = (x1 + a, y1 + b) if fmt == "xywh" else (a, b)
    if fmt != "xyxy_norm":
        x1, x2, y1, y2 = x1 / width, x2 / width, y1 / height, y2 / height
    clipped = [min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2)]
    return clipped, clipped[2] > clipped[0] and clipped[3] > clipped[1]


@given(
    boxes=st.lists(st.lists(st.floats(-50, 150, width=32), min_size=4, max_size=4), max_size=8),
    fmt=st.sampled_from(["xyxy", "xyxy_norm", "xywh"]),
    height=st.integers(1, 120),
    width=st.integers(1, 120),
)
def test_conversion_matches_a_per_box_reference(boxes, fmt, height, width):
    out, keep = to_normalised_xyxy(torch.tensor(boxes).view(-1, 4), fmt, (height, width))
    for i, box in enumerate(boxes):
        expected, kept = _reference(box, fmt, height, width)
        torch.testing.assert_close(out[i], torch.tensor(expected), atol=1e-5, rtol=1e-5)
        if abs(expected[2] - expected[0]) > 1e-5 and abs(expected[3] - expected[1]) > 1e-5:
            assert bool(keep[i]) == kept
