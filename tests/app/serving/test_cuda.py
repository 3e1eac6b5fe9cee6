"""The GPU path (skipped without CUDA; `benchmarks/gpu_check.sh` runs these on a GPU machine): the torch runner
on CUDA (pinned copies, channels-last) computes the CPU's outputs, float16 within its precision, detection on
the GPU equals the CPU's, ONNX Runtime's GPU providers equal torch, and /detect serves from the GPU."""

from __future__ import annotations

import base64

import pytest
import torch

from app.serving.backends import OnnxGraph, TorchRunner, providers
from ssd_core.data.images import encode_png, model_inputs
from ssd_core.models import build_model
from ssd_core.models.postprocess import detect_with_spec
from tests.app.conftest import make_settings, start_client

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("ssd-small", 4).eval()


@pytest.fixture
def batch(model, shapes):
    return model_inputs([shapes[k].image for k in range(4)], model.spec)


def test_the_cuda_runner_computes_the_cpu_outputs(model, batch):
    runner = TorchRunner(model, CUDA)
    assert runner.memory_format == torch.channels_last
    loc, conf = runner(batch)
    want_loc, want_conf = TorchRunner(model, CPU)(batch)
    assert loc.is_cuda and loc.dtype == torch.float32
    torch.testing.assert_close(loc.cpu(), want_loc, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(conf.cpu(), want_conf, atol=1e-3, rtol=1e-3)
    assert next(model.parameters()).device == CPU  # the version's own weights are untouched


def test_float16_stays_within_its_precision(model, batch):
    loc, conf = TorchRunner(model, CUDA, torch.float16)(batch)
    want_loc, want_conf = TorchRunner(model, CPU)(batch)
    assert loc.dtype == torch.float32  # detection decodes in float32
    torch.testing.assert_close(loc.cpu(), want_loc, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(conf.cpu(), want_conf, atol=2e-2, rtol=2e-2)
    assert next(model.parameters()).dtype == torch.float32


def test_detection_on_the_gpu_equals_the_cpu(model, batch):
    loc, conf = TorchRunner(model, CPU)(batch)
    options = dict(score_threshold=[0.05, 0.1, 0.2, 0.05], max_detections=[50, 5, 20, 100],
                   image_sizes=[(64, 64), (48, 80), (64, 64), (100, 30)])
    on_cpu = detect_with_spec(model.spec, loc, conf, model.priors, **options)
    on_gpu = detect_with_spec(model.spec, loc.cuda(), conf.cuda(), model.priors.cuda(), **options)
    for got, want in zip(on_gpu, on_cpu, strict=True):
        assert torch.equal(got.labels.cpu(), want.labels)
        torch.testing.assert_close(got.scores.cpu(), want.scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.boxes.cpu(), want.boxes, atol=1e-3, rtol=0)


def test_onnxruntime_on_the_gpu_equals_torch(model, batch):
    graph = OnnxGraph(model, CUDA)
    assert graph.providers == providers(CUDA)
    loc, conf = graph.runner(model)(batch)
    want_loc, want_conf = TorchRunner(model, CPU)(batch)
    torch.testing.assert_close(loc.cpu(), want_loc, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(conf.cpu(), want_conf, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_detect_serves_from_the_gpu(tmp_path, shapes, dtype):
    settings = make_settings(tmp_path, device="cuda", inference_dtype=dtype, score_threshold=0.05)
    body = {"images": [{"image": base64.b64encode(encode_png(shapes[0].image)).decode()}]}
    with start_client(settings) as client:
        answer = client.post("/detect", json=body)
        assert answer.status_code == 200, answer.text
        assert client.app.state.host.device.type == "cuda"
        assert client.sample("ssd_inference_compute_seconds_count", route="/detect", backend="torch") == 1
