"""Dynamic batching in the real uvicorn process: a lone request runs at once, concurrent HTTP clients that
queue behind a busy forward share one forward pass, and a client that hangs up while its request waits is
dropped from the queue without being computed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.live import labelled_images, run_service

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("integration-batching")]

DELAY_S = 4.0  # long, so that only a full batch or a hang-up decides before it
BATCH = 3
BUSY_IMAGES = 20 * BATCH  # one request of this many images keeps the inference thread busy for 20 forwards


def sample(url: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


@contextlib.contextmanager
def inference_busy(url: str, images: list[dict]) -> Iterator[None]:
    """A request of `BUSY_IMAGES` images (forwards of `BATCH`) runs while the block does: requests sent in it
    find the inference thread busy and queue for company (a request that finds it idle runs at once)."""
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, f"{url}/detect", json={"images": images}, timeout=120)
        deadline = time.monotonic() + 60
        while sample(url, "ssd_inference_queued_images") == 0:  # its parts are queued
            assert time.monotonic() < deadline and not busy.done(), "the busy request never queued"
            time.sleep(0.01)
        yield
        assert busy.result().status_code == 200


def test_live_batching_and_hang_ups(tmp_path):
    many = [{"image": image["image"]} for image in labelled_images(BUSY_IMAGES, seed=8)]
    images = many[:BATCH]
    env = {"SSD_MAX_BATCH_DELAY_MS": str(int(DELAY_S * 1000)), "SSD_MAX_BATCH_IMAGES": str(BATCH),
           "SSD_MAX_IMAGES_PER_REQUEST": str(BUSY_IMAGES)}
    with run_service(tmp_path, **env) as service:
        url = service.url
        # a lone request to an idle service runs at once, not after the delay
        started = time.monotonic()
        assert httpx.post(f"{url}/detect", json={"images": images[:1]}, timeout=60).status_code == 200
        assert time.monotonic() - started < DELAY_S
        # a client that gives up after 0.5 s: its request, queued behind a busy forward, is still waiting for company
        with inference_busy(url, many), pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/detect", json={"images": images[:1]}, timeout=httpx.Timeout(60, read=0.5))
        deadline = time.monotonic() + 10
        while sample(url, "ssd_inference_cancelled_images_total", route="/detect") < 1:
            assert time.monotonic() < deadline, "the hang-up was not noticed"
            time.sleep(0.1)
        assert sample(url, "ssd_inference_queued_images") == 0

        # BATCH concurrent clients behind a busy forward fill a batch: one forward, long before the delay
        with inference_busy(url, many), ThreadPoolExecutor(BATCH) as pool:
            started = time.monotonic()
            answers = list(pool.map(
                lambda image: httpx.post(f"{url}/detect", json={"images": [image]}, timeout=60), images))
        assert [a.status_code for a in answers] == [200] * BATCH, [a.text for a in answers]
        assert time.monotonic() - started < DELAY_S
        # the lone request, two busy requests of BUSY_IMAGES / BATCH forwards, the shared one; the hang-up never ran
        forwards = 1 + 2 * BUSY_IMAGES // BATCH + 1
        assert sample(url, "ssd_inference_batch_size_count", route="/detect") == forwards
        assert sample(url, "ssd_inference_batch_size_sum", route="/detect") == 1 + 2 * BUSY_IMAGES + BATCH
        assert sample(url, "ssd_http_requests_total", route="/detect", method="POST", status="499") == 1
