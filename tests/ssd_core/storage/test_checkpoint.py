"""CheckpointStore: round trip, corrupt/truncated newest falls back, pruning, atomicity, optimizer resume."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from ssd_core.storage import checkpoint as checkpoint_module
from ssd_core.storage.checkpoint import CheckpointError, CheckpointStore


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 4, generator=generator), torch.randn(16, 2, generator=generator))
        for _ in range(count)
    ]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert a[key].dtype == b[key].dtype, key


def _save_versions(store: CheckpointStore, versions) -> dict[int, dict]:
    saved = {}
    for v in versions:
        state = {"w": torch.full((3,), float(v)), "step": torch.tensor(v)}
        store.save(state, {"version": v, "step": 10 * v})
        saved[v] = state
    return saved


def test_round_trip_weights_meta_and_optimizer(tmp_path):
    model = _model()
    optimizer = _sgd(model)
    _train(model, optimizer, _batches(3, seed=1))
    store = CheckpointStore(tmp_path)
    meta = {"version": 7, "step": 3, "model": "ssd-small", "num_classes": 3, "class_names": ["a", "b"]}
    info = store.save(model.state_dict(), meta, optimizer.state_dict())

    assert info.version == 7 and info.step == 3
    assert {p.name for p in tmp_path.iterdir()} == {
        "ckpt-00000007.safetensors",
        "ckpt-00000007.optim.safetensors",
        "ckpt-00000007.json",
    }
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in tmp_path.iterdir())
    sidecar = json.loads((tmp_path / "ckpt-00000007.json").read_text())
    assert sidecar["files"]["weights"]["size"] == os.path.getsize(tmp_path / "ckpt-00000007.safetensors")
    assert sidecar["meta"] == meta

    loaded = CheckpointStore(tmp_path).load_latest()
    assert loaded is not None
    state_dict, loaded_meta, optimizer_state, training_weights = loaded
    _assert_state_equal(state_dict, model.state_dict())  # includes BatchNorm's int64 num_batches_tracked
    assert loaded_meta == meta
    assert training_weights is None
    original = optimizer.state_dict()
    assert optimizer_state["param_groups"] == original["param_groups"]
    assert optimizer_state["state"].keys() == original["state"].keys()
    for index, values in original["state"].items():
        _assert_state_equal(optimizer_state["state"][index], values)


def test_weights_only_checkpoint_has_no_optimizer(tmp_path):
    store = CheckpointStore(tmp_path)
    info = store.save({"w": torch.ones(2)}, {"version": 1})
    assert info.optimizer is None
    assert not (tmp_path / "ckpt-00000001.optim.safetensors").exists()
    assert store.load(1).optimizer_state is None


def test_training_weights_round_trip_are_verified_and_pruned(tmp_path):
    """An EMA checkpoint: served weights in the main file, the raw training weights beside them."""
    store = CheckpointStore(tmp_path, keep=1)
    served, raw = _model(seed=1).state_dict(), _model(seed=2).state_dict()
    info = store.save(served, {"version": 1}, training_weights=raw)
    assert info.training_weights == tmp_path / "ckpt-00000001.training.safetensors"
    sidecar = json.loads((tmp_path / "ckpt-00000001.json").read_text())
    assert sidecar["files"]["training_weights"]["size"] == os.path.getsize(info.training_weights)
    loaded = store.load(1)
    _assert_state_equal(loaded.state_dict, served)
    _assert_state_equal(loaded.training_weights, raw)

    store.save(served, {"version": 2}, training_weights=raw)
    flipped = bytearray((tmp_path / "ckpt-00000002.training.safetensors").read_bytes())
    flipped[-1] ^= 1
    (tmp_path / "ckpt-00000002.training.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="sha256"):
        store.load(2)
    assert not (tmp_path / "ckpt-00000001.training.safetensors").exists()  # pruned with its version

    store.save(served, {"version": 2})  # rewritten without: no stale raw weights left behind
    assert store.load(2).training_weights is None
    assert not (tmp_path / "ckpt-00000002.training.safetensors").exists()


def test_empty_directory_loads_none_and_missing_version_raises(tmp_path):
    store = CheckpointStore(tmp_path / "new")
    assert store.load_latest() is None
    assert store.versions() == []
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        store.load(3)


@pytest.mark.parametrize("version", [None, -1, "3", 1.0, True, 10**8])
def test_bad_version_is_a_value_error(tmp_path, version):
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="version"):
        store.save({"w": torch.ones(1)}, {"version": version})
    assert list(tmp_path.iterdir()) == []


def _truncate_weights(path):
    data = (path / "ckpt-00000003.safetensors").read_bytes()
    (path / "ckpt-00000003.safetensors").write_bytes(data[: len(data) // 2])


def _garbage_sidecar(path):
    (path / "ckpt-00000003.json").write_bytes(b"{not json")


def _missing_weights(path):
    (path / "ckpt-00000003.safetensors").unlink()


def _flipped_byte(path):
    file = path / "ckpt-00000003.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    file.write_bytes(bytes(data))


def _sidecar_without_files(path):
    (path / "ckpt-00000003.json").write_text(
        json.dumps({"format": "ssd-checkpoint/1", "meta": {"version": 3}})
    )


@pytest.mark.parametrize(
    "corrupt", [_truncate_weights, _garbage_sidecar, _missing_weights, _flipped_byte, _sidecar_without_files]
)
def test_corrupt_newest_falls_back_to_previous(tmp_path, corrupt, caplog):
    store = CheckpointStore(tmp_path)
    saved = _save_versions(store, [1, 2, 3])
    corrupt(tmp_path)
    with caplog.at_level("WARNING"):
        loaded = CheckpointStore(tmp_path).load_latest()
    assert loaded is not None
    assert loaded.meta["version"] == 2
    _assert_state_equal(loaded.state_dict, saved[2])
    assert "checkpoint" in caplog.text
    with pytest.raises(CheckpointError):
        store.load(3)


def test_corrupt_optimizer_file_falls_back(tmp_path):
    model = _model()
    optimizer = _sgd(model)
    _train(model, optimizer, _batches(1, seed=0))
    store = CheckpointStore(tmp_path)
    store.save(model.state_dict(), {"version": 1}, optimizer.state_dict())
    store.save(model.state_dict(), {"version": 2}, optimizer.state_dict())
    (tmp_path / "ckpt-00000002.optim.safetensors").write_bytes(b"\0" * 16)
    assert store.load_latest().meta["version"] == 1


def test_all_corrupt_loads_none(tmp_path):
    store = CheckpointStore(tmp_path)
    _save_versions(store, [1])
    (tmp_path / "ckpt-00000001.safetensors").write_bytes(b"")
    assert store.load_latest() is None


def test_keeps_newest_k(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    saved = _save_versions(store, [1, 2, 3, 4])
    assert [info.version for info in store.versions()] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000003.json",
        "ckpt-00000003.safetensors",
        "ckpt-00000004.json",
        "ckpt-00000004.safetensors",
    ]
    _assert_state_equal(store.load(3).state_dict, saved[3])
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore(tmp_path, keep=0)


def test_leftover_temp_file_is_never_loaded_and_is_cleaned(tmp_path):
    store = CheckpointStore(tmp_path)
    _save_versions(store, [1])
    # a crashed writer of version 2: temp files only, no sidecar
    leftover = tmp_path / ".tmp-ckpt-ckpt-00000002.safetensors.abc123"
    leftover.write_bytes(b"partial")
    assert store.load_latest().meta["version"] == 1
    assert [info.version for info in store.versions()] == [1]
    CheckpointStore(tmp_path)  # start-up cleans the leftovers
    assert not leftover.exists()


def test_read_only_store_reads_but_never_writes_prunes_or_cleans(tmp_path):
    writer = CheckpointStore(tmp_path, keep=2)
    saved = _save_versions(writer, [1, 2])
    in_flight = tmp_path / ".tmp-ckpt-ckpt-00000003.safetensors.abc123"  # the writer's save in progress
    in_flight.write_bytes(b"partial")
    before = sorted(p.name for p in tmp_path.iterdir())
    reader = CheckpointStore(tmp_path, keep=1, read_only=True)
    assert in_flight.exists()  # not removed on construction
    assert [info.version for info in reader.versions()] == [1, 2]  # keep=1 prunes nothing on read
    _assert_state_equal(reader.load_latest().state_dict, saved[2])
    _assert_state_equal(reader.load(1).state_dict, saved[1])
    with pytest.raises(PermissionError, match="read-only"):
        reader.save({"w": torch.zeros(3)}, {"version": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_read_only_store_does_not_create_its_directory(tmp_path):
    reader = CheckpointStore(tmp_path / "missing", read_only=True)
    assert not (tmp_path / "missing").exists()
    assert reader.versions() == [] and reader.load_latest() is None
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        reader.load(1)


def test_crash_before_sidecar_keeps_previous(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    saved = _save_versions(store, [1])
    real_replace = os.replace

    def crash_on_sidecar(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", crash_on_sidecar)
    with pytest.raises(OSError, match="disk gone"):
        store.save({"w": torch.zeros(3), "step": torch.tensor(2)}, {"version": 2})
    monkeypatch.undo()
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())  # the failed writer cleaned up
    loaded = CheckpointStore(tmp_path).load_latest()
    assert loaded.meta["version"] == 1
    _assert_state_equal(loaded.state_dict, saved[1])


def test_resumed_optimizer_continues_exactly(tmp_path):
    batches = _batches(4, seed=10)
    uninterrupted = _model(seed=3)
    optimizer = _sgd(uninterrupted)
    _train(uninterrupted, optimizer, batches)

    first = _model(seed=3)
    first_optimizer = _sgd(first)
    _train(first, first_optimizer, batches[:2])
    CheckpointStore(tmp_path).save(
        first.state_dict(), {"version": 1, "step": 2}, first_optimizer.state_dict()
    )

    resumed = _model(seed=99)  # different init: everything must come from the checkpoint
    resumed_optimizer = _sgd(resumed)
    state_dict, meta, optimizer_state, _ = CheckpointStore(tmp_path).load_latest()
    resumed.load_state_dict(state_dict)
    resumed_optimizer.load_state_dict(optimizer_state)
    _train(resumed, resumed_optimizer, batches[meta["step"] :])

    _assert_state_equal(resumed.state_dict(), uninterrupted.state_dict())
    for index, values in optimizer.state_dict()["state"].items():
        _assert_state_equal(resumed_optimizer.state_dict()["state"][index], values)


def test_pinned_versions_survive_pruning_and_reopening(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    state = _model().state_dict()
    for version in range(2):
        store.save(state, {"version": version})
    store.pin(0)
    for version in range(2, 6):
        store.save(state, {"version": version})
    assert [info.version for info in store.versions()] == [0, 4, 5]
    reopened = CheckpointStore(tmp_path, keep=2)
    assert reopened.pinned() == {0}
    reopened.load(0)  # intact
    assert reopened.unpin(0) and not reopened.unpin(0)
    reopened.save(state, {"version": 6})
    assert [info.version for info in reopened.versions()] == [5, 6]
    with pytest.raises(CheckpointError, match="no saved version 1 to pin"):
        reopened.pin(1)
    with pytest.raises(PermissionError):
        CheckpointStore(tmp_path, keep=2, read_only=True).pin(6)
