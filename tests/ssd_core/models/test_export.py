"""ONNX and TorchScript export: ONNX Runtime and libtorch give torch's outputs within 1e-4 for ssd-small
and ssd300, on batch sizes other than the one exported with (the batch axis is dynamic), with the priors
and the metadata inside the file. One export per (model, format), reused by every assertion."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnxruntime
import pytest
import torch

from ssd_core.models import build_model
from ssd_core.models.export import (
    EXAMPLE_BATCH,
    ONNX_OPTIMIZER_LOGGERS,
    export_model,
    metadata,
    read_torchscript_metadata,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit")  # torch deprecates TorchScript, still supported

MODELS = {"ssd-small": 4, "ssd300": 21}
TOLERANCE = 1e-4


def trained_looking(name: str) -> torch.nn.Module:
    """A model whose BatchNorm statistics are not the identity, so running it in training mode would show."""
    torch.manual_seed(0)
    model = build_model(name, MODELS[name])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model name, format) -> (model, path): exported once per module."""
    cache: dict[tuple[str, str], tuple[torch.nn.Module, object]] = {}

    def get(name: str, fmt: str):
        if (name, fmt) not in cache:
            model = trained_looking(name)
            meta = metadata(model, version=7, class_names=[f"c{i}" for i in range(MODELS[name] - 1)])
            path = export_model(model, tmp_path_factory.mktemp(fmt) / f"{name}.{fmt}", fmt, meta)
            cache[name, fmt] = model, path
        return cache[name, fmt]

    return get


def images_for(model, batch: int) -> torch.Tensor:
    size = model.spec.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def assert_close(outputs, model, batch: int) -> None:
    with torch.no_grad():
        expected = model(images_for(model, batch))  # loc [B, P, 4], conf [B, P, C], priors [P, 4]
    for got, want, name in zip(outputs, expected, ("loc", "conf", "priors"), strict=True):
        got = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
        assert got.shape == want.shape, name
        assert (got - want).abs().max() <= TOLERANCE, (name, float((got - want).abs().max()))


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_runtime_matches_torch_on_dynamic_batches(exported, name):
    model, path = exported(name, "onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (images,) = session.get_inputs()
    assert images.name == "images" and images.shape[1:] == [3, model.spec.image_size, model.spec.image_size]
    assert isinstance(images.shape[0], str)  # symbolic: any batch size
    assert [o.name for o in session.get_outputs()] == ["loc", "conf", "priors"]
    for batch in (1, EXAMPLE_BATCH + 1):
        assert_close(session.run(None, {"images": images_for(model, batch).numpy()}), model, batch)
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["model"] == name and meta["version"] == "7" and meta["image_size"] == str(model.spec.image_size)
    assert json.loads(meta["class_names"]) == [f"c{i}" for i in range(MODELS[name] - 1)]
    assert json.loads(meta["pixel_mean"]) == list(model.spec.pixel_mean)


@pytest.mark.parametrize("name", list(MODELS))
def test_torchscript_matches_torch_on_dynamic_batches(exported, name):
    model, path = exported(name, "torchscript")
    loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        for batch in (1, EXAMPLE_BATCH + 1):
            assert_close(loaded(images_for(model, batch)), model, batch)
    meta = read_torchscript_metadata(path)
    assert meta["model"] == name and json.loads(meta["variance"]) == list(model.spec.prior_config.variance)


def test_export_leaves_the_model_untouched_and_refuses_unknown_formats(tmp_path):
    model = trained_looking("ssd-small").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="format must be one of onnx, torchscript, got 'tflite'"):
        export_model(model, tmp_path / "m", "tflite")
    export_model(model, tmp_path / "m.pt", "torchscript")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_onnx_export_logs_none_of_the_optimizer_passes(tmp_path, caplog):
    """The ONNX optimizer logs ~20 INFO lines per export (a server log would show them on every
    GET /model/export); they are silenced during the export, and the loggers' levels restored after."""
    levels = {name: logging.getLogger(name).level for name in ONNX_OPTIMIZER_LOGGERS}
    with caplog.at_level(logging.INFO):
        export_model(trained_looking("ssd-small"), tmp_path / "m.onnx", "onnx", {})
    noisy = [r.getMessage() for r in caplog.records if r.name.startswith(ONNX_OPTIMIZER_LOGGERS)]
    assert noisy == []
    assert {name: logging.getLogger(name).level for name in ONNX_OPTIMIZER_LOGGERS} == levels
