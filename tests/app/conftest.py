"""Fixtures for the service tests: the small model, a temporary checkpoint directory, a fresh
Prometheus registry per app, and synthetic labelled images."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file

from app.core.settings import Settings
from app.main import create_app
from ssd_core.data.datasets import collate
from ssd_core.data.images import encode_png
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.loss.multibox import MultiBoxLoss
from ssd_core.models import build_model
from ssd_core.training.trainer import TrainConfig, Trainer

TOKEN = "s3cret-token"


def make_settings(tmp_path, **overrides) -> Settings:
    values = dict(
        model="ssd-small", num_classes=4, class_names=["rectangle", "ellipse", "triangle"],
        checkpoint_dir=tmp_path / "checkpoints", max_images_per_request=4, max_image_pixels=200 * 200,
        max_body_bytes=4 * 2**20, finetune_queue_size=2, finetune_max_steps=200,
        # the queue, journal, checkpoint and rollback tests run the unprotected mode, where every step
        # publishes and every image trains at the job's rate; the gated default, the holdout and the
        # warm-up are tested in test_gate.py
        publish="every_step", holdout_fraction=0.0, warmup_steps=0,
        # torch serves: the suite starts hundreds of apps, and an ONNX export costs each seconds; the default
        # (auto: ONNX Runtime on a CPU) is served in tests/app/serving/test_backends.py, tests/app/test_server.py
        # and the README's quick start (tests/integration/test_readme_examples.py)
        backend="torch",
    )
    values.update(overrides)
    return Settings(**values)


class ServiceClient(TestClient):
    """A TestClient that also exposes the app's registry for `sample(...)` reads."""

    registry: CollectorRegistry

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    @property
    def version(self) -> int:
        return self.get("/model").json()["version"]


def start_client(settings: Settings) -> ServiceClient:
    registry = CollectorRegistry()
    client = ServiceClient(create_app(settings, registry))
    client.registry = registry
    return client


@pytest.fixture
def settings(tmp_path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def client(settings) -> Iterator[ServiceClient]:
    with start_client(settings) as c:
        yield c


@pytest.fixture
def unchanged(client):
    """After the test: still version 0, nothing queued or trained, still healthy."""
    yield
    assert client.version == 0
    assert client.sample("ssd_finetune_queue_depth") == 0
    assert client.sample("ssd_finetune_steps_total") == 0
    assert client.get("/readyz").status_code == 200


@pytest.fixture
def shapes() -> ShapesDataset:
    return ShapesDataset(8, image_size=64, seed=3)


def labelled(dataset, indices=(0, 1)) -> list[dict]:
    """JSON image items: base64 PNG, pixel boxes, labels (`dataset`: a ShapesDataset or a list of Samples)."""
    items = []
    for i in indices:
        sample = dataset[i]
        items.append({
            "image": base64.b64encode(encode_png(sample.image)).decode(),
            "boxes": sample.boxes.tolist(),
            "labels": sample.labels.tolist(),
        })
    return items


def png_bytes(dataset: ShapesDataset, index: int = 0) -> bytes:
    return encode_png(dataset[index].image)


class HeldForward:
    """Holds the first forward pass of `host` until `release()`. Requests sent meanwhile queue behind it and
    batch; a request that finds the inference thread idle would run at once, alone."""

    def __init__(self, host, monkeypatch) -> None:
        self.entered, self._released = threading.Event(), threading.Event()
        predict = host.predict

        def held(images, served):
            if not self.entered.is_set():
                self.entered.set()
                assert self._released.wait(30)
            return predict(images, served)

        monkeypatch.setattr(host, "predict", held)

    def release(self) -> None:
        self._released.set()


class CriterionSpy:
    """Wraps the trainer's criterion and records every `compute`: its class mask (as a list), its output
    and whether it trained (gradients on) or only verified the update."""

    def __init__(self, criterion):
        self.criterion = criterion
        self.masks, self.training_outputs = [], []

    @classmethod
    def install(cls, client) -> CriterionSpy:
        trainer = client.app.state.worker.trainer
        trainer.criterion = spy = cls(trainer.criterion)
        return spy

    def __getattr__(self, name):
        return getattr(self.criterion, name)

    def compute(self, predictions, targets, class_mask=None):
        self.masks.append(None if class_mask is None else class_mask.tolist())
        output = self.criterion.compute(predictions, targets, class_mask)
        if torch.is_grad_enabled():
            self.training_outputs.append(output)
        return output


def assert_error(response, status: int, field: str | None, code: str | None = None) -> dict:
    """The response is the one JSON error shape with this status and field."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field"}
    assert error["field"] == field, error
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# the images the `trained_weights` model was overfit on: it detects them with mAP@0.5 1.0, so damage shows
OVERFIT = ShapesDataset(4, image_size=64, seed=11, min_objects=1, max_objects=2, min_size=0.3)


@pytest.fixture(scope="session")
def trained_weights(tmp_path_factory) -> Path:
    """safetensors of ssd-small after 60 steps on the OVERFIT images (~20 s on one core, once per session)."""
    torch.manual_seed(0)
    model = build_model("ssd-small", 4)
    trainer = Trainer(model, MultiBoxLoss.ssd_pytorch(4),
                      TrainConfig(lr=0.05, warmup_steps=10, clip_grad_norm=10.0), "cpu")
    images, targets = collate([OVERFIT[i] for i in range(len(OVERFIT))], model.spec)
    for _ in range(60):
        trainer.step(images, targets)
    path = tmp_path_factory.mktemp("trained") / "ssd-small.safetensors"
    save_file(trainer.weights(), path)
    return path
