"""Helpers of the gated-publishing tests: settings, a damaged batch, the trainer's state compared bitwise."""

from __future__ import annotations

import copy

import torch

from ssd_core.data.datasets import Sample
from tests.app.conftest import make_settings

EVERYTHING = (0, 1, 2, 3)


def gated_settings(tmp_path, **overrides):
    # max_learning_rate: the damaging jobs of these tests train at 0.05, above the default limit (10 x 1e-3)
    values = dict(publish="gated", holdout_fraction=0.0, warmup_steps=0, gate_min_images=4, checkpoint_keep=20,
                  max_learning_rate=0.1)
    return make_settings(tmp_path, **{**values, **overrides})


def shifted(sample: Sample) -> Sample:
    """Boxes moved right and down by half their size (clipped to the image): a coordinate bug upstream."""
    boxes = sample.boxes.clone()
    size = boxes[:, 2:] - boxes[:, :2]
    boxes[:, :2] += size / 2
    boxes[:, 2:] = (boxes[:, 2:] + size / 2).clamp(max=float(sample.image.shape[-1]))
    return Sample(sample.image, boxes, sample.labels, sample.difficult)


def trainer_state(client) -> tuple[dict, dict, int]:
    trainer = client.app.state.worker.trainer
    return copy.deepcopy(trainer.module.state_dict()), copy.deepcopy(trainer.optimizer.state_dict()), trainer.steps


def assert_bitwise_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_bitwise_equal(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_bitwise_equal(x, y)
    else:
        assert a == b
