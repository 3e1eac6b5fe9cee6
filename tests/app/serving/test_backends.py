"""Serving backends: ONNX Runtime answers the detections of torch within 1e-4, on the start-up version and
on every version a fine-tune publishes (the graph is exported once, each version's weights put into it); a
version ONNX Runtime cannot build is served by torch and counted; a graph whose weights are folded is refused."""

from __future__ import annotations

import base64
import copy
import threading

import pytest
import torch
from prometheus_client import CollectorRegistry

from app.core.metrics import Metrics
from app.core.settings import Settings
from app.serving import backends, model_host
from app.serving.backends import OnnxGraph, TorchRunner, serving_backend
from app.serving.model_host import ModelHost
from ssd_core.data.images import encode_png, model_inputs
from ssd_core.models import build_model
from ssd_core.models.export import onnx_model
from ssd_core.models.postprocess import detect_with_spec
from tests.app.conftest import labelled, make_settings, start_client
from tests.app.online.test_worker import wait_for

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def demo_model():
    torch.manual_seed(0)
    return build_model("ssd-small", 4).eval()


@pytest.fixture(scope="module")
def graph(demo_model):
    return OnnxGraph(demo_model, CPU)


def perturbed(model, seed: int):
    """A copy with every weight and BatchNorm statistic changed: what a fine-tune's published version differs by."""
    changed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in changed.state_dict().values():
            if tensor.is_floating_point():
                tensor.mul_(1 + 0.05 * torch.randn(tensor.shape, generator=generator))
    return changed


def test_a_session_of_the_graph_computes_the_outputs_of_torch_for_any_weights(demo_model, graph, shapes):
    images = model_inputs([shapes[k].image for k in range(3)], demo_model.spec)
    for model in (demo_model, perturbed(demo_model, 1), perturbed(demo_model, 2)):
        loc, conf = graph.runner(model)(images)
        want_loc, want_conf = TorchRunner(model, CPU)(images)
        assert torch.allclose(loc, want_loc, atol=1e-4) and torch.allclose(conf, want_conf, atol=1e-4)
    other_loc, _ = graph.runner(perturbed(demo_model, 1))(images)
    assert not torch.allclose(other_loc, graph.runner(demo_model)(images)[0], atol=1e-3)  # the weights did change


def test_a_graph_that_folds_weights_away_is_refused(demo_model, monkeypatch):
    monkeypatch.setattr(backends, "onnx_model", lambda model, optimize: onnx_model(model, optimize=True))
    with pytest.raises(ValueError, match="is no weight of the model"):
        OnnxGraph(demo_model, CPU)


def test_a_version_onnxruntime_cannot_build_is_served_by_torch_and_counted(tmp_path, demo_model, graph, monkeypatch):
    metrics = Metrics(CollectorRegistry())
    settings = make_settings(tmp_path, backend="onnxruntime")
    monkeypatch.setattr(model_host, "OnnxGraph", lambda model, device, threads: graph)
    host = ModelHost(settings, metrics, demo_model, 0, 0)
    assert host.current.runner.backend == "onnxruntime"

    def broken(model):
        raise RuntimeError("no session today")

    monkeypatch.setattr(graph, "runner", broken)
    published = host.publish(perturbed(demo_model, 3), 1)
    assert published.runner.ready.wait(60)
    assert published.runner.backend == "torch" and host.current is published
    assert metrics.registry.get_sample_value("ssd_backend_fallbacks_total") == 1
    images = torch.zeros(1, 3, 256, 256)
    assert torch.equal(host.predict(images, published)[1], TorchRunner(published.model, CPU)(images)[1])


def test_a_failed_graph_export_serves_every_version_with_torch(tmp_path, demo_model, monkeypatch):
    def failing(model, device, threads):
        raise RuntimeError("export failed")

    monkeypatch.setattr(model_host, "OnnxGraph", failing)
    metrics = Metrics(CollectorRegistry())
    host = ModelHost(make_settings(tmp_path, backend="onnxruntime"), metrics, demo_model, 0, 0)
    host.publish(perturbed(demo_model, 4), 1)
    assert host.current.runner.backend == "torch"
    assert metrics.registry.get_sample_value("ssd_backend_fallbacks_total") == 2  # each version


def torch_detections(served, images, spec, priors, settings):
    batch = model_inputs(images, spec)
    loc, conf = TorchRunner(served.model, CPU)(batch)
    return detect_with_spec(spec, loc, conf, priors, score_threshold=settings.score_threshold,
                            nms_iou=settings.nms_iou, max_detections=settings.max_detections,
                            image_sizes=[(image.shape[1], image.shape[2]) for image in images])


def test_detect_with_onnxruntime_equals_torch_before_and_after_a_fine_tune_publishes(tmp_path, shapes):
    settings = make_settings(tmp_path, backend="onnxruntime", score_threshold=0.05)
    images = [shapes[k].image for k in range(3)]
    body = {"images": [{"image": base64.b64encode(encode_png(image)).decode()} for image in images]}
    with start_client(settings) as client:
        host = client.app.state.host
        for _ in range(2):
            served = host.current
            assert served.runner.ready.wait(60)  # a published version's session is built in the background
            assert served.runner.backend == "onnxruntime"
            assert client.get("/model").json()["backend"] == "onnxruntime"
            answer = client.post("/detect", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model_version"] == served.version
            expected = torch_detections(served, images, host.spec, host.priors, settings)
            assert sum(len(found.scores) for found in expected) > 0
            for got, want in zip(answer.json()["detections"], expected, strict=True):
                assert [d["label"] for d in got] == want.labels.tolist()
                scores, boxes = torch.tensor([d["score"] for d in got]), torch.tensor([d["box"] for d in got])
                torch.testing.assert_close(scores, want.scores, atol=1e-4, rtol=0)
                torch.testing.assert_close(boxes.reshape(-1, 4), want.boxes, atol=1e-4, rtol=0)
            job = client.post("/finetune", json={"images": labelled(shapes, (2, 3)), "steps": 2}).json()
            wait_for(client, job["job_id"], {"succeeded"})
            assert host.current.version > served.version
        assert client.sample("ssd_inference_compute_seconds_count", route="/detect", backend="onnxruntime") == 2
        assert client.sample("ssd_backend_fallbacks_total") == 0


def test_float16_needs_cuda_and_the_torch_backend(tmp_path, demo_model):
    with pytest.raises(ValueError, match="float16 runs on the torch backend"):
        make_settings(tmp_path, backend="onnxruntime", inference_dtype="float16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            ModelHost(make_settings(tmp_path, inference_dtype="float16", device="cpu"), Metrics(CollectorRegistry()),
                      demo_model, 0, 0)


def test_a_publish_never_waits_for_the_session_torch_serves_until_it_is_ready(tmp_path, demo_model, graph,
                                                                              monkeypatch):
    metrics = Metrics(CollectorRegistry())
    monkeypatch.setattr(model_host, "OnnxGraph", lambda model, device, threads: graph)
    host = ModelHost(make_settings(tmp_path, backend="onnxruntime"), metrics, demo_model, 0, 0)
    release = threading.Event()
    build = graph.runner

    def slow(model):
        release.wait(60)
        return build(model)

    monkeypatch.setattr(graph, "runner", slow)
    published = host.publish(perturbed(demo_model, 5), 1)  # returns while the session is still being built
    assert host.current is published and published.runner.backend == "torch" and not published.runner.ready.is_set()
    images = torch.zeros(2, 3, 256, 256)
    torch.testing.assert_close(host.predict(images, published)[1], TorchRunner(published.model, CPU)(images)[1])
    release.set()
    assert published.runner.ready.wait(60) and published.runner.backend == "onnxruntime"
    torch.testing.assert_close(host.predict(images, published)[1], TorchRunner(published.model, CPU)(images)[1],
                               atol=1e-4, rtol=0)
    assert metrics.registry.get_sample_value("ssd_backend_fallbacks_total") == 0


def test_auto_serves_with_onnxruntime_on_a_cpu_and_with_torch_on_a_gpu_or_in_a_trainer():
    assert Settings.model_fields["backend"].default == "auto"
    assert serving_backend("auto", CPU) == "onnxruntime"
    assert serving_backend("auto", torch.device("cuda", 0)) == "torch"
    assert serving_backend("auto", CPU, "server") == "onnxruntime"
    assert serving_backend("auto", CPU, "trainer") == "torch"  # publishes often; the servers answer /detect
    assert serving_backend("torch", CPU) == "torch"
    assert serving_backend("onnxruntime", torch.device("cuda")) == "onnxruntime"
    with pytest.raises(ValueError, match="SSD_BACKEND must be auto, torch or onnxruntime, got 'tensorrt'"):
        serving_backend("tensorrt", CPU)


def test_a_cpu_deployment_with_the_default_backend_is_served_by_onnxruntime(tmp_path, demo_model, graph, monkeypatch):
    monkeypatch.setattr(model_host, "OnnxGraph", lambda model, device, threads: graph)
    metrics = Metrics(CollectorRegistry())
    host = ModelHost(make_settings(tmp_path, backend="auto", device="cpu"), metrics, demo_model, 0, 0)
    assert host.backend == "onnxruntime" and host.current.runner.backend == "onnxruntime"
    assert metrics.registry.get_sample_value(
        "ssd_model_info", {"architecture": "ssd-small", "num_classes": "4", "device": "cpu", "backend": "onnxruntime"}) == 1
    published = host.publish(perturbed(demo_model, 6), 1)
    assert published.runner.ready.wait(60) and published.runner.backend == "onnxruntime"
    trainer = ModelHost(make_settings(tmp_path, backend="auto", device="cpu", role="trainer"), Metrics(CollectorRegistry()),
                        demo_model, 0, 0)
    assert trainer.backend == "torch" and trainer.graph is None


def test_a_shutdown_waits_for_the_sessions_still_being_built(tmp_path, demo_model, graph, monkeypatch):
    # a process that exits while ONNX Runtime builds a session aborts ("terminate called without an active
    # exception", exit -6): the lifespan's last step waits for them
    monkeypatch.setattr(model_host, "OnnxGraph", lambda model, device, threads: graph)
    host = ModelHost(make_settings(tmp_path, backend="onnxruntime"), Metrics(CollectorRegistry()), demo_model, 0, 0)
    release, build = threading.Event(), graph.runner

    def slow(model):
        release.wait(60)
        return build(model)

    monkeypatch.setattr(graph, "runner", slow)
    published = host.publish(perturbed(demo_model, 7), 1)
    assert not host.finish_builds(0.2)  # still building
    release.set()
    assert host.finish_builds(60) and published.runner.backend == "onnxruntime"
