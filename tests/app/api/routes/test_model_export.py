"""GET /model/export: the served version streamed as ONNX or TorchScript, equal to the served model;
token-protected when SSD_API_TOKEN is set."""

from __future__ import annotations

import io

import onnxruntime
import pytest
import torch

from tests.app.conftest import TOKEN, assert_error, make_settings, start_client

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit")


def served_outputs(client, images):
    with torch.no_grad():
        loc, conf, priors = client.app.state.host.current.model(images)
    return loc, conf, priors


def test_onnx_export_of_the_served_version_runs_in_onnx_runtime(client):
    response = client.get("/model/export", params={"format": "onnx"})
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == "0"
    assert 'filename="ssd-small-v0.onnx"' in response.headers["content-disposition"]
    session = onnxruntime.InferenceSession(response.content, providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 256, 256)
    outputs = session.run(None, {"images": images.numpy()})
    for got, want in zip(outputs, served_outputs(client, images), strict=True):
        assert (torch.from_numpy(got) - want).abs().max() <= 1e-4
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["version"] == "0" and meta["class_names"] == '["rectangle", "ellipse", "triangle"]'


def test_torchscript_export_and_bad_format(client):
    response = client.get("/model/export", params={"format": "torchscript"})
    assert response.status_code == 200, response.text
    module = torch.jit.load(io.BytesIO(response.content), map_location="cpu")
    images = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        got = module(images)
    for g, want in zip(got, served_outputs(client, images), strict=True):
        assert (g - want).abs().max() <= 1e-4
    assert_error(client.get("/model/export", params={"format": "tflite"}), 422, "query.format")


def test_export_needs_the_token_when_one_is_set(tmp_path):
    with start_client(make_settings(tmp_path, api_token=TOKEN)) as client:
        assert_error(client.get("/model/export"), 401, "Authorization", "unauthorized")
        response = client.get("/model/export", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200 and response.content[:2] != b"{\""
