"""The served version as a file another runtime loads (ONNX or TorchScript), one export at a time."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

from app.core.settings import Settings
from app.serving.model_host import ModelHost
from ssd_core.models.export import SUFFIXES, export_model, metadata

_EXPORTING = threading.Lock()  # one export at a time: each one holds a copy of the weights and both cores


def export_served(host: ModelHost, settings: Settings, fmt: str) -> tuple[Path, int]:
    """Export the served version to a file in a fresh temporary directory; returns (file, version).
    The caller removes the directory (`file.parent`) once done with the file."""
    served = host.current
    directory = Path(tempfile.mkdtemp(prefix="ssd-export-"))
    names = settings.object_class_names()
    try:
        with _EXPORTING:
            path = export_model(served.model, directory / f"{settings.model}-v{served.version}{SUFFIXES[fmt]}", fmt,
                                metadata(served.model, served.version, names))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return path, served.version
