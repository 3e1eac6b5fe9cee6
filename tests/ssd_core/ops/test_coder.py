"""Box coder: hand values and exact round trips."""

from __future__ import annotations

import math

import torch

from ssd_core.ops.coder import decode, encode
from ssd_core.ops.priors import VOC_300, prior_boxes
from tests.ssd_core.random_data import random_boxes


def test_encode_by_hand():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    width = 0.2 * math.exp(0.2)  # log(w / pw) / 0.2 = 1
    box = torch.tensor([[0.52 - width / 2, 0.3, 0.52 + width / 2, 0.7]])  # centre x moved by 0.02
    # dcx = 0.02 / (0.1 * 0.2) = 1, dcy = 0, dw = 1, dh = log(1) = 0
    torch.testing.assert_close(encode(box, prior), torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(encode(box, prior, (1.0, 1.0)), torch.tensor([[0.1, 0.0, 0.2, 0.0]]))


def test_round_trip_boxes_and_offsets():
    generator = torch.Generator().manual_seed(0)
    priors = prior_boxes(VOC_300)[:500].double()
    boxes = random_boxes(500, generator).double()
    torch.testing.assert_close(decode(encode(boxes, priors), priors), boxes)
    offsets = torch.randn(2, 500, 4, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(encode(decode(offsets, priors, (0.2, 0.3)), priors, (0.2, 0.3)), offsets)
    # float32 within float32 rounding
    torch.testing.assert_close(decode(encode(boxes.float(), priors.float()), priors.float()), boxes.float(),
                               rtol=1e-5, atol=1e-6)
