"""Only checkpoints that verify are offered as loadable versions."""

from __future__ import annotations

import torch

from app.serving.saved_versions import intact_versions
from ssd_core.storage.checkpoint import CheckpointStore


def test_a_damaged_checkpoint_is_left_out(tmp_path):
    store = CheckpointStore(tmp_path)
    for version in (1, 2, 3):
        store.save({"weight": torch.full((4,), float(version))}, {"version": version, "step": version})
    weights = tmp_path / "ckpt-00000002.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert [info.version for info in intact_versions(store)] == [1, 3]
