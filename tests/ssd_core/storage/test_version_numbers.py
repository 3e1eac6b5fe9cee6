"""ssd_core.storage.version_numbers: a number is on disk before it is handed out, never handed out twice,
and the numbers a crash took are recorded as lost."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from ssd_core.storage.checkpoint import CheckpointStore
from ssd_core.storage.checkpoint_meta import next_version
from ssd_core.storage.version_numbers import MARK_NAME, VersionNumbers


def save(store: CheckpointStore, version: int) -> None:
    store.save({"w": torch.full((2,), float(version))}, {"version": version, "step": version})


def test_numbers_grow_and_each_is_on_disk_before_it_is_handed_out(tmp_path):
    store = CheckpointStore(tmp_path)
    numbers = VersionNumbers(store, resumed=0)
    for expected in (1, 2, 3):
        assert numbers.reserve() == expected == numbers.reserve()  # a reservation holds until taken
        assert json.loads((tmp_path / MARK_NAME).read_text())["issued"] == expected
        assert numbers.take() == expected
    numbers.reserve()
    numbers.discard()  # something may name 4: it is skipped
    assert numbers.take() == 5 and numbers.lost == []


def test_a_restart_after_a_crash_never_reissues_a_number_and_reports_the_lost_ones(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 3)
    numbers = VersionNumbers(store, resumed=3)
    served = [numbers.take() for _ in range(4)]  # 4..7 published, never checkpointed: then kill -9
    assert served == [4, 5, 6, 7]

    restarted = VersionNumbers(CheckpointStore(tmp_path), resumed=3)  # the newest checkpoint is still 3
    assert restarted.take() == 8
    assert restarted.lost == [(4, 7)]
    again = VersionNumbers(CheckpointStore(tmp_path), resumed=8)  # lost ranges survive later restarts
    assert again.lost == [(4, 7)] and again.take() == 9


def test_without_a_mark_the_checkpoint_files_bound_the_numbers(tmp_path):
    """A directory written before the mark existed, with a torn newest checkpoint (sidecar missing)."""
    store = CheckpointStore(tmp_path)
    save(store, 2)
    (tmp_path / "ckpt-00000005.safetensors").write_bytes(b"torn")
    numbers = VersionNumbers(store, resumed=2)
    assert numbers.lost == [(3, 5)] and numbers.take() == 6
    assert next_version(store) == 7  # `ssd train` into the same directory goes past them too


def test_a_disk_that_refuses_the_mark_hands_out_no_number(tmp_path, monkeypatch):
    numbers = VersionNumbers(CheckpointStore(tmp_path), resumed=0)
    assert numbers.take() == 1

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        numbers.reserve()
    monkeypatch.undo()
    assert numbers.take() == 2  # nothing was handed out meanwhile


def test_in_memory_numbers_need_no_directory():
    numbers = VersionNumbers(None, resumed=4)
    assert [numbers.take(), numbers.take()] == [5, 6] and numbers.lost == []


def test_a_read_only_store_records_nothing(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 2)
    (tmp_path / "ckpt-00000004.safetensors").write_bytes(b"torn")
    before = sorted(os.listdir(tmp_path))
    VersionNumbers(CheckpointStore(tmp_path, read_only=True), resumed=2)
    assert sorted(os.listdir(tmp_path)) == before
