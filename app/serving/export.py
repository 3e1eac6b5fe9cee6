"""The served version as a file another runtime loads (ONNX or TorchScript), one export at a time and never
beside training.

Tracing (`torch.export`, `torch.jit.trace`) and the trainer's backward pass share torch's process-global FX
state, so an export holds the host's `exclusive` lock, which the trainer holds for each step, gate and state
change: an export waits for the current step, and the trainer for the export. Each export writes to its
own temporary directory `ssd-export-<pid>-*`; `remove_leftover_exports` removes those of processes that are
gone (a `kill -9` during an export leaves one).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from app.core.settings import Settings
from app.serving.model_host import ModelHost
from ssd_core.models.export import SUFFIXES, export_model, metadata

logger = logging.getLogger(__name__)

_PREFIX = "ssd-export-"
_EXPORT_DIRECTORY = re.compile(rf"^{_PREFIX}(\d+)-")


def export_served(host: ModelHost, settings: Settings, fmt: str) -> tuple[Path, int]:
    """Export the served version to a file in a fresh temporary directory; returns (file, version).
    The caller removes the directory (`file.parent`) once done with the file."""
    directory = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
    names = settings.object_class_names()
    try:
        with host.exclusive:
            served = host.current
            path = export_model(served.model, directory / f"{settings.model}-v{served.version}{SUFFIXES[fmt]}", fmt,
                                metadata(served.model, served.version, names))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return path, served.version


def remove_leftover_exports(temp_dir: str | None = None) -> list[Path]:
    """Remove the export directories that no running process owns (its pid is gone, or is this process's,
    which has exported nothing yet: a previous process of a restarted container); the removed ones."""
    removed = []
    for path in Path(temp_dir or tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        match = _EXPORT_DIRECTORY.match(path.name)
        if match is None or not path.is_dir() or _running(int(match.group(1))):
            continue
        logger.warning("removing the export directory %s left by a stopped process", path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
