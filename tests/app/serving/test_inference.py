"""Dynamic batching in the service: concurrent requests share forward passes, with the same answers as
one image at a time; a bad image fails only its own request; a full queue answers 503 with Retry-After;
a request whose client has gone is never computed."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from prometheus_client import CollectorRegistry

from app.api.loss_requests import criterion_for
from app.api.schemas import LossOptions
from app.core.errors import ClientGone
from app.core.metrics import Metrics
from app.serving.inference import InferenceWorker, batch_policy, forward
from ssd_core.data.datasets import collate
from ssd_core.evaluation.mean_ap import predict
from tests.app.conftest import HeldForward, assert_error, labelled, make_settings, png_bytes, start_client

CONCURRENT = 4


def body(data: bytes) -> dict:
    return {"images": [{"image": base64.b64encode(data).decode()}], "score_threshold": 0.05, "max_detections": 5}


def post_together(client, bodies: list[dict], path: str = "/detect") -> list:
    """POST every body at once from its own thread (a barrier lines them up)."""
    barrier = threading.Barrier(len(bodies))

    def send(payload: dict):
        barrier.wait()
        return client.post(path, json=payload)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def behind_a_held_request(client, monkeypatch, first: bytes, send: Callable[[], list], queued_images: int) -> list:
    """`send()` (in a thread) while the inference thread runs a first /detect request (image `first`), held until
    `queued_images` images wait behind it: the requests of `send` queue for company instead of running at once."""
    held = HeldForward(client.app.state.host, monkeypatch)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, "/detect", json=body(first))
        assert held.entered.wait(30)
        sent = pool.submit(send)
        while client.app.state.inference.queue.queued_images < queued_images:
            assert not sent.done(), sent.result()
            time.sleep(0.01)
        held.release()
        assert running.result().status_code == 200
        return sent.result()


@pytest.fixture
def batching_client(tmp_path):
    # a long delay and a batch of exactly CONCURRENT images: the batch is dispatched when full, never by the clock
    settings = make_settings(tmp_path, max_batch_images=CONCURRENT, max_batch_delay_ms=10_000)
    with start_client(settings) as client:
        yield client


def test_a_lone_request_runs_at_once_without_waiting_the_delay(batching_client, shapes):
    client = batching_client  # a 10 s delay: a request that waited for company would be seen
    started = time.monotonic()
    assert client.post("/detect", json=body(png_bytes(shapes, 0))).status_code == 200
    assert time.monotonic() - started < 5.0
    assert client.sample("ssd_inference_batch_size_sum", route="/detect") == 1
    assert client.sample("ssd_inference_queue_wait_seconds_count", route="/detect") == 1
    assert client.sample("ssd_inference_queue_wait_seconds_sum", route="/detect") < 1.0


def test_concurrent_requests_share_one_forward_with_the_answers_of_one_image_at_a_time(
        batching_client, shapes, monkeypatch):
    client = batching_client
    bodies = [body(png_bytes(shapes, k)) for k in range(CONCURRENT)]
    responses = behind_a_held_request(client, monkeypatch, png_bytes(shapes, CONCURRENT),
                                      lambda: post_together(client, bodies), CONCURRENT)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert {r.json()["model_version"] for r in responses} == {0}
    # two forwards: the held request alone, then the CONCURRENT requests that queued behind it
    assert client.sample("ssd_inference_batch_size_count", route="/detect") == 2
    assert client.sample("ssd_inference_batch_size_sum", route="/detect") == 1 + CONCURRENT
    assert client.sample("ssd_inference_queue_wait_seconds_count", route="/detect") == 1 + CONCURRENT
    assert client.sample("ssd_inference_compute_seconds_count", route="/detect", backend="torch") == 2
    model = client.app.state.host.current.model
    for k, response in enumerate(responses):  # reference: the image alone through the library
        expected = predict(model, [shapes[k].image], score_threshold=0.05, max_detections=5)[0]
        found = response.json()["detections"][0]
        assert [d["label"] for d in found] == expected.labels.tolist()
        assert torch.allclose(torch.tensor([d["box"] for d in found]).reshape(-1, 4), expected.boxes, atol=1e-3)
        assert torch.allclose(torch.tensor([d["score"] for d in found]), expected.scores, atol=1e-5)


def test_a_bad_image_is_refused_before_queuing_and_fails_no_other_request(tmp_path, shapes, monkeypatch):
    settings = make_settings(tmp_path, max_batch_images=CONCURRENT - 1, max_batch_delay_ms=10_000)
    with start_client(settings) as client:
        bodies = [body(png_bytes(shapes, k)) for k in range(CONCURRENT - 1)]
        bodies.insert(1, body(b"\x89PNG\r\n\x1a\n not really"))
        responses = behind_a_held_request(client, monkeypatch, png_bytes(shapes, CONCURRENT),
                                          lambda: post_together(client, bodies), CONCURRENT - 1)
        assert_error(responses[1], 422, "images[0].image", "invalid_image")
        assert [r.status_code for k, r in enumerate(responses) if k != 1] == [200] * (CONCURRENT - 1)
        # the three good images filled one batch (after the held one): the bad one never reached the queue
        assert client.sample("ssd_inference_batch_size_sum", route="/detect") == 1 + CONCURRENT - 1
        assert client.sample("ssd_inference_batch_size_count", route="/detect") == 2


def test_score_loss_images_share_a_forward_with_detect_images(tmp_path, shapes, monkeypatch):
    settings = make_settings(tmp_path, max_batch_images=2, max_batch_delay_ms=10_000)
    with start_client(settings) as client:
        barrier = threading.Barrier(2)

        def send(path: str, payload: dict):
            barrier.wait()
            return client.post(path, json=payload)

        def both() -> list:
            with ThreadPoolExecutor(2) as pool:
                scored = pool.submit(send, "/score-loss", {"images": labelled(shapes, (0,))})
                detected = pool.submit(send, "/detect", body(png_bytes(shapes, 1)))
                return [scored.result(), detected.result()]

        scored, detected = behind_a_held_request(client, monkeypatch, png_bytes(shapes, 2), both, 2)
        assert scored.status_code == 200 and detected.status_code == 200, (scored.text, detected.text)
        # one forward of 2 images, observed under each route in it (/detect also ran the held request alone)
        assert client.sample("ssd_inference_batch_size_count", route="/score-loss") == 1
        assert client.sample("ssd_inference_batch_size_sum", route="/score-loss") == 2
        assert client.sample("ssd_inference_batch_size_count", route="/detect") == 2
        assert client.sample("ssd_inference_batch_size_sum", route="/detect") == 1 + 2
        model = client.app.state.host.current.model
        images, targets = collate([shapes[0]], model.spec)
        with torch.inference_mode():
            expected = criterion_for(LossOptions(), 4).compute(model(images), targets)
        assert scored.json()["loss_l"] == pytest.approx(float(expected.loss_l), rel=1e-5)
        assert scored.json()["loss_c"] == pytest.approx(float(expected.loss_c), rel=1e-5)


def test_full_queue_answers_503_with_retry_after(tmp_path, shapes, monkeypatch):
    settings = make_settings(tmp_path, max_batch_images=1, max_batch_delay_ms=0, inference_queue_size=4)
    with start_client(settings) as client:
        host = client.app.state.host
        entered, release = threading.Event(), threading.Event()
        real_predict = host.predict

        def blocking_predict(images, served):
            entered.set()
            assert release.wait(30)
            return real_predict(images, served)

        monkeypatch.setattr(host, "predict", blocking_predict)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(client.post, "/detect", json=body(png_bytes(shapes, 0)))
            assert entered.wait(30)  # the worker holds the first request
            four = {"images": [{"image": base64.b64encode(png_bytes(shapes, k)).decode()} for k in range(4)]}
            queued = pool.submit(client.post, "/detect", json=four)
            while client.app.state.inference.queue.queued_images < 4:
                threading.Event().wait(0.01)
            refused = client.post("/detect", json=body(png_bytes(shapes, 1)))
            assert_error(refused, 503, None, "queue_full")
            assert refused.headers["Retry-After"] == "1"
            release.set()
            assert running.result().status_code == 200
            answer = queued.result()
            assert answer.status_code == 200 and len(answer.json()["detections"]) == 4
        assert client.sample("ssd_http_requests_total", route="/detect", method="POST", status="503") == 1
        assert client.sample("ssd_inference_batch_size_count", route="/detect") == 5  # 1 + four of one image
        assert client.get("/readyz").status_code == 200


def gone_after(seconds: float):
    """The disconnect wait of a request whose client disconnects after `seconds`."""

    async def wait() -> None:
        await asyncio.sleep(seconds)

    return wait


def test_a_request_whose_client_has_gone_leaves_the_queue_uncomputed(tmp_path):
    settings = make_settings(tmp_path, max_batch_images=2, max_batch_delay_ms=10_000)
    metrics = Metrics(CollectorRegistry())

    class CountingHost:
        device = torch.device("cpu")

        def __init__(self) -> None:
            self.calls: list[int] = []
            self.released = threading.Event()  # the first forward runs until the test releases it

        def predict(self, images, served):
            self.calls.append(len(images))
            assert self.released.wait(30)
            return images[:, :1], images[:, :2], None

    host = CountingHost()
    worker = InferenceWorker(host, batch_policy(settings), metrics)  # type: ignore[arg-type]
    served = type("Served", (), {"version": 7, "backend": "torch"})()

    async def scenario() -> list:
        # the worker is busy with a first request, so the next ones queue for company (10 s delay)
        held = asyncio.ensure_future(forward(gone_after(60), worker, torch.full((1, 3, 4, 4), 9.0), served, "/detect"))
        while not host.calls:
            await asyncio.sleep(0.01)
        with pytest.raises(ClientGone):
            await forward(gone_after(0.05), worker, torch.zeros(1, 3, 4, 4), served, "/detect")
        assert worker.queue.queued_images == 0
        assert metrics.registry.get_sample_value("ssd_inference_cancelled_images_total", {"route": "/detect"}) == 1
        # two live requests fill a batch: computed once, each gets its own rows
        images = [torch.full((1, 3, 4, 4), float(k)) for k in range(2)]
        two = asyncio.gather(*(forward(gone_after(60), worker, im, served, "/detect") for im in images))
        while worker.queue.queued_images < 2:
            await asyncio.sleep(0.01)
        host.released.set()
        await held
        return await two

    try:
        (loc0, _), (loc1, _) = asyncio.run(scenario())
        assert host.calls == [1, 2]  # the cancelled request was never part of a forward pass
        assert loc0.unique().tolist() == [0.0] and loc1.unique().tolist() == [1.0]
    finally:
        worker.stop(5)
