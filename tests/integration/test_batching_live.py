"""Dynamic batching in the real uvicorn process: concurrent HTTP clients share one forward pass, and a
client that hangs up while its request waits is dropped from the queue without being computed."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.live import labelled_images, run_service

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("integration-batching")]

DELAY_S = 4.0  # long, so that only a full batch or a hang-up decides before it
BATCH = 3


def sample(url: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def test_live_batching_and_hang_ups(tmp_path):
    images = [{"image": image["image"]} for image in labelled_images(BATCH, seed=8)]
    env = {"SSD_MAX_BATCH_DELAY_MS": str(int(DELAY_S * 1000)), "SSD_MAX_BATCH_IMAGES": str(BATCH)}
    with run_service(tmp_path, **env) as service:
        url = service.url
        # a client that gives up after 0.5 s: its request is still waiting for company
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/detect", json={"images": images[:1]}, timeout=httpx.Timeout(60, read=0.5))
        deadline = time.monotonic() + 10
        while sample(url, "ssd_inference_cancelled_images_total", route="/detect") < 1:
            assert time.monotonic() < deadline, "the hang-up was not noticed"
            time.sleep(0.1)
        assert sample(url, "ssd_inference_queued_images") == 0

        # BATCH concurrent clients fill a batch: one forward, long before the delay
        started = time.monotonic()
        with ThreadPoolExecutor(BATCH) as pool:
            answers = list(pool.map(
                lambda image: httpx.post(f"{url}/detect", json={"images": [image]}, timeout=60), images))
        assert [a.status_code for a in answers] == [200] * BATCH, [a.text for a in answers]
        assert time.monotonic() - started < DELAY_S
        assert sample(url, "ssd_inference_batch_size_count", route="/detect") == 1  # the hang-up never ran
        assert sample(url, "ssd_inference_batch_size_sum", route="/detect") == BATCH
        assert sample(url, "ssd_http_requests_total", route="/detect", method="POST", status="499") == 1
