"""Atomic file writes: a reader sees the old file or all of the new one, never a part, even after a crash."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, temp_prefix: str) -> None:
    """Write `data` to `path` so that readers see either the old file or all of the new one (a temp
    file `temp_prefix + name + ".*"` in the same directory, fsync'd, renamed, then the directory fsync'd)."""
    fd, temp_name = tempfile.mkstemp(prefix=temp_prefix + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide checkpoints from readers running as other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    _fsync_directory(path.parent)
