"""Detection called directly (no HTTP): the same boxes as the library on one image at a time, the
settings' limits where the request gives none, a gone client abandons the request, and the PNG drawing."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import CollectorRegistry

from app.core.errors import ClientGone
from app.core.metrics import Metrics
from app.serving.detection import detect_images, prepare_images, queue_detection, render_png
from app.serving.inference import InferenceWorker, batch_policy, forward, queued_detections
from app.serving.model_host import ModelHost, initial_model
from ssd_core.data.images import decode_image_bytes, model_inputs
from ssd_core.evaluation.mean_ap import predict
from ssd_core.models.postprocess import Detections, detect_with_spec
from tests.app.conftest import HeldForward, make_settings


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


def test_requests_batched_together_each_get_the_detections_of_their_own_options(tmp_path, shapes, monkeypatch):
    """Two detection requests with different options and a raw-output request share one forward pass; the
    batch's detections, decoded at once on the inference thread, equal each request's decoded on its own."""
    settings = make_settings(tmp_path, max_batch_images=4, max_batch_delay_ms=10_000, nms_iou=0.5)
    metrics = Metrics(CollectorRegistry())
    model, _ = initial_model(settings, None)
    host = ModelHost(settings, metrics, model, 0, 0)
    inference = InferenceWorker(host, batch_policy(settings), metrics)
    served = host.current
    first = [shapes[0].image, shapes[1].image[:, :40, :56]]
    second = [shapes[2].image]
    try:
        held = HeldForward(host, monkeypatch)  # the three queue behind a running forward, so they batch

        async def together():
            running = forward(never_gone, inference, model_inputs([shapes[4].image], host.spec), served, "/score-loss")
            running = asyncio.ensure_future(running)
            await asyncio.to_thread(held.entered.wait, 30)
            prepared = [prepare_images(images, host.spec) for images in (first, second)]
            queued = [queue_detection(*prepared[0], 0.05, 7, "/detect", served, inference, settings),
                      queue_detection(*prepared[1], 0.2, 2, "/v2/models/ssd/infer", served, inference, settings)]
            batched = asyncio.gather(
                *(queued_detections(never_gone, inference, parts) for parts in queued),
                forward(never_gone, inference, model_inputs([shapes[3].image], host.spec), served, "/score-loss"),
            )
            while inference.queue.queued_images < 4:
                await asyncio.sleep(0.01)
            held.release()
            await running
            return await batched

        found_first, found_second, (loc, _) = asyncio.run(together())
        assert metrics.registry.get_sample_value("ssd_inference_batch_size_sum", {"route": "/detect"}) == 4
        assert loc.shape[0] == 1
        for images, found, threshold, limit in ((first, found_first, 0.05, 7), (second, found_second, 0.2, 2)):
            batch, sizes = prepare_images(images, host.spec)
            loc, conf, priors = host.predict(batch, served)
            alone = detect_with_spec(host.spec, loc, conf, priors, score_threshold=threshold, nms_iou=0.5,
                                     max_detections=limit, image_sizes=sizes)
            assert sum(len(d.scores) for d in alone) > 0
            for got, want in zip(found, alone, strict=True):
                assert torch.equal(got.labels, want.labels)
                torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=0)
                torch.testing.assert_close(got.boxes, want.boxes, atol=1e-4, rtol=0)
    finally:
        inference.stop(5)
