"""The meta of an `ssd` checkpoint: its keys, the next version number, the prior set it records."""

from __future__ import annotations

import json

import pytest
import torch

from ssd_core.models import build_model
from ssd_core.storage import CheckpointError, CheckpointStore, checkpoint_meta, next_version, recorded_priors


def test_checkpoint_meta_keys_in_order_then_the_extra_ones():
    model = build_model("ssd300", 81, "voc")
    meta = checkpoint_meta(model, ("a", "b"), 3, 40, {"config": {"lr": 0.1}, "world_size": 2})
    assert meta == {
        "version": 3, "step": 40, "model": "ssd300", "num_classes": 81, "priors": "voc", "class_names": ["a", "b"],
        "config": {"lr": 0.1}, "world_size": 2,
    }
    assert list(meta) == ["version", "step", "model", "num_classes", "priors", "class_names", "config", "world_size"]
    assert json.loads(json.dumps(meta)) == meta
    assert list(checkpoint_meta(model, [], 1, 0)) == ["version", "step", "model", "num_classes", "priors", "class_names"]


def test_next_version_is_one_past_the_newest(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    assert next_version(store) == 1
    model = build_model("ssd-small", 4)
    for step in range(3):
        store.save({"w": torch.zeros(1)}, checkpoint_meta(model, ["x", "y", "z"], next_version(store), step))
    assert [info.version for info in store.versions()] == [2, 3]  # pruned to 2: numbering goes on
    assert next_version(store) == 4


@pytest.mark.parametrize(("meta", "default_model", "priors"), [
    ({"model": "ssd300", "priors": "coco"}, None, "coco"),
    ({"priors": "voc"}, None, "voc"),
    ({"model": "ssd300"}, None, "voc"),  # written before the prior set was recorded
    ({"model": "ssd512"}, "ssd-small", "voc"),  # the meta's model wins over the default
    ({"model": "ssd-small"}, None, "scaled"),
    ({}, "ssd300", "voc"),
])
def test_recorded_priors(meta, default_model, priors):
    assert recorded_priors(meta, default_model) == priors


@pytest.mark.parametrize(("meta", "default_model"), [({}, None), ({"model": "yolo"}, "ssd300"), ({}, "yolo")])
def test_recorded_priors_refuses_a_meta_without_priors_or_a_known_model(meta, default_model):
    with pytest.raises(CheckpointError, match="records no priors and no known model"):
        recorded_priors(meta, default_model)
