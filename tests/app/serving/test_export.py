"""Exporting the served version: a file named after the model and version in a fresh directory, and
nothing left behind when the export fails."""

from __future__ import annotations

import tempfile

import pytest
from prometheus_client import CollectorRegistry

from app.core.metrics import Metrics
from app.serving import export
from app.serving.export import export_served
from app.serving.model_host import ModelHost, initial_model
from tests.app.conftest import make_settings

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit")


@pytest.fixture
def host(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    settings = make_settings(tmp_path)
    model, _ = initial_model(settings, None)
    return settings, ModelHost(settings, Metrics(CollectorRegistry()), model, 3, 0)


def test_the_served_version_is_exported_to_its_own_directory(host, tmp_path):
    settings, model_host = host
    path, version = export_served(model_host, settings, "torchscript")
    assert version == 3 and path.name == "ssd-small-v3.pt" and path.stat().st_size > 0
    assert path.parent.parent == tmp_path / "temp" and path.parent.name.startswith("ssd-export-")


def test_a_failed_export_leaves_no_directory(host, tmp_path, monkeypatch):
    settings, model_host = host

    def fail(*args, **kwargs):
        raise RuntimeError("export failed")

    monkeypatch.setattr(export, "export_model", fail)
    with pytest.raises(RuntimeError):
        export_served(model_host, settings, "onnx")
    assert list((tmp_path / "temp").iterdir()) == []
