"""Load: a bounded soak with concurrent clients against a live server, and queue pressure.

The soak mixes `/detect`, `/score-loss` (JSON predictions, JSON images, safetensors) and `/finetune`
jobs (polled to their end) for SSD_SOAK_SECONDS (default 120, two minutes in every `make test`; see README.md for a longer run) and then
checks: no 5xx, every job final, model versions never decrease for any client, the server's resident
memory after warm-up stays within a bound, and `/metrics` agrees exactly with what the clients did.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import safetensors.torch
import torch

from ssd_core.data.images import encode_png
from ssd_core.data.synthetic import ShapesDataset
from tests.integration.live import LiveService, labelled_images, run_service
from tests.reliability.conftest import PLUMBING, rss_mib, scrape

pytestmark = pytest.mark.xdist_group("reliability-live")

SOAK_SECONDS = float(os.environ.get("SSD_SOAK_SECONDS", "120"))
WARMUP_FRACTION = 0.25  # RSS is taken as the baseline once this share of the soak has passed
RSS_GROWTH_BOUND_MIB = 64.0
QUEUE_SIZE = 3
FINAL_STATES = {"succeeded", "failed", "cancelled", "rejected"}
JOB_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[LiveService]:
    with run_service(tmp_path_factory.mktemp("load"), module=True, SSD_FINETUNE_QUEUE_SIZE=str(QUEUE_SIZE),
                     SSD_MAX_IMAGES_PER_REQUEST="8", **PLUMBING) as live:
        yield live


@dataclass
class Record:
    """What one client thread did: (route template, method, status) counts, latencies, versions seen."""

    requests: Counter = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    versions: list[int] = field(default_factory=list)
    images: Counter = field(default_factory=Counter)  # route -> images in successful requests
    jobs: dict[str, int] = field(default_factory=dict)  # accepted job id -> images per step

    def call(self, http: httpx.Client, method: str, url: str, route: str, **kwargs) -> httpx.Response:
        start = time.perf_counter()
        response = http.request(method, url, **kwargs)
        self.latencies.setdefault(route, []).append(time.perf_counter() - start)
        self.requests[route, method, str(response.status_code)] += 1
        return response


class Bodies:
    """Request bodies built once: small labelled images, predictions for the model's priors."""

    def __init__(self, num_priors: int, num_classes: int) -> None:
        self.items = labelled_images(4, seed=11, image_size=64)
        generator = torch.Generator().manual_seed(0)
        loc = torch.randn(2, num_priors, 4, generator=generator)  # [B, P, 4]
        conf = torch.randn(2, num_priors, num_classes, generator=generator)  # [B, P, C]
        targets = torch.tensor([[[0.1, 0.1, 0.5, 0.6, 0, 0]], [[0.3, 0.2, 0.9, 0.8, 2, 0]]])  # [B, 1, 6]
        self.json_predictions = json.dumps({
            "predictions": {"loc": loc[:1].tolist(), "conf": conf[:1].tolist()},
            "targets": [[{"box": targets[0, 0, :4].tolist(), "label": 0}]],
        })
        self.binary = safetensors.torch.save({"loc": loc, "conf": conf, "targets": targets})
        self.detect_png = encode_png(ShapesDataset(1, image_size=64, seed=12)[0].image)


def _versions_never_decrease(record: Record) -> None:
    assert record.versions == sorted(record.versions), record.versions


def detect_client(url: str, bodies: Bodies, until: float, record: Record) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        turn = 0
        while time.monotonic() < until:
            turn += 1
            if turn % 2:
                count = 1 + turn % 3
                body = {"json": {"images": [{"image": item["image"]} for item in bodies.items[:count]]}}
            else:
                count = 1
                body = {"files": [("images", ("shape.png", bodies.detect_png, "image/png"))]}
            response = record.call(http, "POST", "/detect", "/detect", **body)
            if response.status_code == 200:
                record.versions.append(response.json()["model_version"])
                record.images["/detect"] += count


def score_client(url: str, bodies: Bodies, until: float, record: Record) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        turn = 0
        while time.monotonic() < until:
            turn += 1
            if turn % 3 == 0:
                kwargs = {"content": bodies.binary, "headers": {"Content-Type": "application/octet-stream"}}
            elif turn % 3 == 1:
                kwargs = {"content": bodies.json_predictions, "headers": {"Content-Type": "application/json"}}
            else:
                kwargs = {"json": {"images": bodies.items[:2]}}
            response = record.call(http, "POST", "/score-loss", "/score-loss", **kwargs)
            if response.status_code == 200:
                record.versions.append(response.json()["model_version"])
                if "json" in kwargs:
                    record.images["/score-loss"] += 2


def finetune_client(url: str, bodies: Bodies, until: float, record: Record) -> None:
    """Submit a short job, poll it to its end, repeat; a 429 (queue full) is a valid answer."""
    with httpx.Client(base_url=url, timeout=60) as http:
        turn = 0
        while time.monotonic() < until:
            turn += 1
            images = bodies.items[: 2 + turn % 2]
            if turn % 4 == 0:  # multipart upload
                files = [("images", (f"{k}.png", base64.b64decode(item["image"]), "image/png"))
                         for k, item in enumerate(images)]
                notes = json.dumps([{"boxes": item["boxes"], "labels": item["labels"]} for item in images])
                kwargs = {"files": files, "data": {"annotations": notes, "steps": "1"}}
            else:
                kwargs = {"json": {"images": images, "steps": 1 + turn % 2, "learning_rate": 1e-4}}
            response = record.call(http, "POST", "/finetune", "/finetune", **kwargs)
            if response.status_code != 202:
                time.sleep(0.2)
                continue
            job = response.json()
            record.jobs[job["job_id"]] = job["num_images"]
            while job["status"] not in FINAL_STATES:
                time.sleep(0.1)
                job = record.call(http, "GET", f"/finetune/{job['job_id']}", "/finetune/{job_id}").json()
                if job["model_version"] is not None:
                    record.versions.append(job["model_version"])


def _run_clients(
    clients: list[Callable], url: str, bodies: Bodies, seconds: float
) -> tuple[list[Record], list[threading.Thread], list[BaseException]]:
    until = time.monotonic() + seconds
    records = [Record() for _ in clients]
    errors: list[BaseException] = []

    def guarded(client: Callable, record: Record) -> None:
        try:
            client(url, bodies, until, record)
        except BaseException as error:  # surfaced below; a dead client thread must fail the test
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=pair) for pair in zip(clients, records, strict=True)]
    for thread in threads:
        thread.start()
    return records, threads, errors


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.timeout(SOAK_SECONDS + 2 * JOB_TIMEOUT_S + 60)  # beyond the suite-wide 300 s for long soaks
def test_soak_mixed_clients(service):
    http = httpx.Client(base_url=service.url, timeout=60)
    model = http.get("/model").json()
    bodies = Bodies(model["num_priors"], model["num_classes"])
    before = scrape(service.url)
    clients = [detect_client, detect_client, score_client, score_client, finetune_client, finetune_client]
    start = time.monotonic()
    records, threads, errors = _run_clients(clients, service.url, bodies, SOAK_SECONDS)
    time.sleep(SOAK_SECONDS * WARMUP_FRACTION)
    rss_warm = rss_mib(service.process.pid)
    for thread in threads:
        thread.join(timeout=SOAK_SECONDS + JOB_TIMEOUT_S)
    duration = time.monotonic() - start
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads), "a client did not finish: a job never ended?"
    rss_end = rss_mib(service.process.pid)
    after = scrape(service.url)

    requests = sum((r.requests for r in records), Counter())
    assert not [key for key in requests if key[2].startswith("5")], requests
    for record in records:
        _versions_never_decrease(record)
    # every accepted job reached a final state (the finetune clients poll until it does)
    jobs = {job_id: images for r in records for job_id, images in r.jobs.items()}
    finals = Counter()
    steps_done = images_trained = 0
    for job_id, images in jobs.items():
        job = http.get(f"/finetune/{job_id}").json()
        assert job["status"] in FINAL_STATES, job
        finals[job["status"]] += 1
        steps_done += job["steps_done"] - job["skipped_steps"]
        images_trained += images * job["steps_done"]
    assert jobs and finals["succeeded"] == len(jobs), finals

    # /metrics agrees exactly with what the clients did
    for (route, method, status), count in requests.items():
        moved = after.value("ssd_http_requests_total", route=route, method=method, status=status) - before.value(
            "ssd_http_requests_total", route=route, method=method, status=status)
        assert moved == count, (route, method, status, moved, count)
    for route in ("/detect", "/score-loss", "/finetune"):
        client_total = sum(count for (r, _, _), count in requests.items() if r == route)
        moved = after.value("ssd_http_request_duration_seconds_count", route=route) - before.value(
            "ssd_http_request_duration_seconds_count", route=route)
        assert moved == client_total, route
    images = sum((r.images for r in records), Counter())
    images["/finetune"] = images_trained
    for route, count in images.items():
        moved = after.value("ssd_images_processed_total", route=route) - before.value(
            "ssd_images_processed_total", route=route)
        assert moved == count, (route, moved, count)
    for state in FINAL_STATES:
        moved = after.value("ssd_finetune_jobs_total", state=state) - before.value("ssd_finetune_jobs_total", state=state)
        assert moved == finals[state], state
    assert after.value("ssd_finetune_steps_total") - before.value("ssd_finetune_steps_total") == steps_done
    assert after.value("ssd_model_version") == http.get("/model").json()["version"] >= max(
        v for r in records for v in r.versions)
    assert after.value("ssd_finetune_queue_depth") == 0

    # memory: no growth per request once warmed up
    assert rss_end - rss_warm < RSS_GROWTH_BOUND_MIB, (rss_warm, rss_end)

    latencies = [t for r in records for ts in r.latencies.values() for t in ts]
    by_route = {route: [t for r in records for t in r.latencies.get(route, [])] for route in
                ("/detect", "/score-loss", "/finetune", "/finetune/{job_id}")}
    print(f"\nsoak: {sum(requests.values())} requests in {duration:.1f} s ({sum(requests.values()) / duration:.1f}/s), "
          f"{len(jobs)} jobs, {steps_done} steps, statuses {dict(Counter(k[2] for k in requests.elements()))}, "
          f"p50 {_percentile(latencies, 0.5) * 1e3:.0f} ms, p99 {_percentile(latencies, 0.99) * 1e3:.0f} ms, "
          f"RSS {rss_warm:.0f} -> {rss_end:.0f} MiB")
    for route, values in by_route.items():
        if values:
            print(f"  {route}: {len(values)} requests, p50 {_percentile(values, 0.5) * 1e3:.0f} ms, "
                  f"p99 {_percentile(values, 0.99) * 1e3:.0f} ms")


def test_queue_pressure_excess_gets_429_and_accepted_jobs_finish(service):
    items = labelled_images(2, seed=13, image_size=64)
    before = scrape(service.url)
    http = httpx.Client(base_url=service.url, timeout=60)
    submitted = [http.post("/finetune", json={"images": items, "steps": 3, "learning_rate": 1e-4})
                 for _ in range(QUEUE_SIZE + 4)]
    statuses = Counter(r.status_code for r in submitted)
    assert set(statuses) == {202, 429}, statuses
    assert QUEUE_SIZE <= statuses[202] <= QUEUE_SIZE + 1 + 1, statuses  # the queue, plus the one(s) already running
    for rejected in (r for r in submitted if r.status_code == 429):
        assert rejected.json()["error"]["code"] == "queue_full" and rejected.headers["Retry-After"]
    accepted = [r.json()["job_id"] for r in submitted if r.status_code == 202]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    finished = {}
    while len(finished) < len(accepted) and time.monotonic() < deadline:
        for job_id in accepted:
            job = http.get(f"/finetune/{job_id}").json()
            if job["status"] in FINAL_STATES:
                finished[job_id] = job
        time.sleep(0.1)
    assert [finished[j]["status"] for j in accepted] == ["succeeded"] * len(accepted)
    assert all(finished[j]["steps_done"] == 3 for j in accepted)
    after = scrape(service.url)
    moved = after.value("ssd_finetune_jobs_total", state="succeeded") - before.value("ssd_finetune_jobs_total",
                                                                                     state="succeeded")
    assert moved == len(accepted)  # a 429 created no job
    assert after.value("ssd_http_requests_total", route="/finetune", status="429") - before.value(
        "ssd_http_requests_total", route="/finetune", status="429") == statuses[429]
    assert after.value("ssd_finetune_queue_depth") == 0
