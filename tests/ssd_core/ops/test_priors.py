"""Prior boxes: counts, hand-computed first/last values, order, clipping."""

from __future__ import annotations

import math

import pytest
import torch

from ssd_core.ops.priors import COCO_300, COCO_512, VOC_300, VOC_512, prior_boxes, scaled_prior_config


@pytest.mark.parametrize(("config", "count"), [(VOC_300, 8732), (COCO_300, 8732), (VOC_512, 24564),
                                               (COCO_512, 24564)])
def test_counts(config, count):
    priors = prior_boxes(config)
    assert priors.shape == (count, 4) and config.num_priors == count
    assert priors.dtype == torch.float32


def test_first_location_of_voc300_by_hand():
    # map 38, step 8: 300 / 8 = 37.5 cells, centre (0 + 0.5) / 37.5; min 30, max 60 pixels
    c = 0.5 / 37.5
    s, s_prime, r = 30 / 300, math.sqrt(30 / 300 * 60 / 300), math.sqrt(2)
    expected = [[c, c, s, s], [c, c, s_prime, s_prime], [c, c, s * r, s / r], [c, c, s / r, s * r]]
    priors = prior_boxes(VOC_300)
    torch.testing.assert_close(priors[:4], torch.tensor(expected))
    # next location is the next column (row-major: x changes first)
    torch.testing.assert_close(priors[4], torch.tensor([1.5 / 37.5, c, s, s]))
    torch.testing.assert_close(priors[38 * 4], torch.tensor([c, 1.5 / 37.5, s, s]))  # second row


def test_second_map_starts_after_the_first():
    priors = prior_boxes(VOC_300)
    start = 38 * 38 * 4
    # map 19, step 16: 300 / 16 = 18.75 cells; min size 60 pixels
    torch.testing.assert_close(priors[start], torch.tensor([0.5 / 18.75, 0.5 / 18.75, 0.2, 0.2]))
    assert priors[start - 1, 2].item() == pytest.approx(0.1 / math.sqrt(2), rel=1e-6)


def test_last_prior_and_clip():
    # 1x1 map: centre 0.5; min 264, ratio 2: (0.88 * sqrt 2, 0.88 / sqrt 2) then swapped; clip caps 1.24 at 1
    s, r = 264 / 300, math.sqrt(2)
    clipped = prior_boxes(VOC_300)
    torch.testing.assert_close(clipped[-1], torch.tensor([0.5, 0.5, s / r, 1.0]))
    raw = prior_boxes(VOC_300.__class__(**{**VOC_300.__dict__, "clip": False}))
    torch.testing.assert_close(raw[-1], torch.tensor([0.5, 0.5, s / r, s * r]))
    torch.testing.assert_close(raw[-4], torch.tensor([0.5, 0.5, s, s]))
    assert clipped.min() >= 0 and clipped.max() <= 1 and raw.max() > 1


def test_scaled_config_counts_and_scales():
    config = scaled_prior_config(300, (5, 3, 1), ((2,), (2, 3), (2,)))
    priors = prior_boxes(config)
    assert len(priors) == 25 * 4 + 9 * 6 + 1 * 4
    assert priors[0, 2].item() == pytest.approx(0.2)  # s_min
    assert priors[25 * 4, 2].item() == pytest.approx(0.55)  # (0.2 + 0.9) / 2
