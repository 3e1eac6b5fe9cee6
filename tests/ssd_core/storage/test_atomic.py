"""Atomic writes (ssd_core.storage.atomic): all of the new file or the old one, no temp file left behind."""

from __future__ import annotations

import os
import stat

import pytest

from ssd_core.storage import atomic
from ssd_core.storage.atomic import atomic_write


def test_atomic_write_replaces_the_file_readable_by_others(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    atomic_write(path, b"new contents", ".tmp-")
    assert path.read_bytes() == b"new contents"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_write_that_fails_keeps_the_old_file_and_removes_its_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")

    def failing_replace(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, b"new", ".tmp-")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert not any(name.startswith(".tmp-") for name in os.listdir(tmp_path))
