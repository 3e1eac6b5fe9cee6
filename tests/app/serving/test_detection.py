"""Detection called directly (no HTTP): the same boxes as the library on one image at a time, the
settings' limits where the request gives none, a gone client abandons the request, and the PNG drawing."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import CollectorRegistry

from app.core.errors import ClientGone
from app.core.metrics import Metrics
from app.serving.detection import detect_images, render_png
from app.serving.inference import InferenceWorker, batch_policy
from app.serving.model_host import ModelHost, initial_model
from ssd_core.data.images import decode_image_bytes
from ssd_core.evaluation.mean_ap import predict
from ssd_core.models.postprocess import Detections
from tests.app.conftest import make_settings


async def never_gone() -> None:
    await asyncio.Event().wait()


async def gone_now() -> None:
    return None


@pytest.fixture
def serving(tmp_path):
    settings = make_settings(tmp_path, max_batch_delay_ms=0, score_threshold=0.05, max_detections=3)
    metrics = Metrics(CollectorRegistry())
    model, _ = initial_model(settings, None)
    host = ModelHost(settings, metrics, model, 0, 0)
    inference = InferenceWorker(host, batch_policy(settings), metrics)
    yield settings, host, inference
    inference.stop(5)


def run_detect(serving, images, score_threshold=None, max_detections=None, client_gone=never_gone):
    settings, host, inference = serving
    return asyncio.run(detect_images(client_gone, images, score_threshold, max_detections, "/detect",
                                     host.current, host, inference, settings))


def test_detections_equal_the_library_on_each_image_in_its_own_pixels(serving, shapes):
    images = [shapes[0].image, shapes[1].image[:, :48, :40]]  # two sizes: boxes in each image's pixels
    found = run_detect(serving, images, score_threshold=0.01, max_detections=5)
    model = serving[1].current.model
    for image, got in zip(images, found, strict=True):
        expected = predict(model, [image], score_threshold=0.01, max_detections=5)[0]
        assert got.labels.tolist() == expected.labels.tolist()
        assert torch.allclose(got.boxes, expected.boxes, atol=1e-3)
        assert torch.allclose(got.scores, expected.scores, atol=1e-5)


def test_unset_limits_are_the_settings_defaults(serving, shapes):
    settings, host, _ = serving
    found = run_detect(serving, [shapes[0].image])[0]
    expected = predict(host.current.model, [shapes[0].image], score_threshold=settings.score_threshold,
                       max_detections=settings.max_detections)[0]
    assert len(found.scores) <= settings.max_detections == 3
    assert found.scores.tolist() == pytest.approx(expected.scores.tolist(), abs=1e-5)


def test_a_client_gone_before_the_result_abandons_the_request(serving, shapes):
    with pytest.raises(ClientGone):
        run_detect(serving, [shapes[0].image], client_gone=gone_now)


def test_render_png_draws_on_a_png_of_the_image_size(serving, shapes):
    settings = serving[0]
    image = shapes[0].image
    found = Detections(boxes=torch.tensor([[4.0, 4.0, 30.0, 30.0]]), scores=torch.tensor([0.9]),
                       labels=torch.tensor([1]))
    png = render_png(image, found, settings)
    drawn = decode_image_bytes(png, settings.max_image_pixels)
    assert png.startswith(b"\x89PNG") and drawn.shape == image.shape
    assert not torch.equal(drawn, image)
