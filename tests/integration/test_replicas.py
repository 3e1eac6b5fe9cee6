"""Replicas as real processes on loopback: one trainer and two servers sharing a checkpoint directory.

Server `single` is one uvicorn process; server `workers` is the production entry point `python -m app`
with SSD_WORKERS=2 and PROMETHEUS_MULTIPROC_DIR, so it also shows /metrics counting the requests of
both worker processes. deploy/nginx/nginx.conf runs in front of them with its backend addresses
rewritten to the loopback ports. Every process is stopped at the end (live.run_service, _stop).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.live import LiveService, labelled_images, run_service
from tests.integration.proxy import run_proxy

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("integration-replicas")]

RELOAD_INTERVAL_S = "0.5"
PICKUP_TIMEOUT_S = 30.0  # the servers' poll interval is 0.5 s; loading ssd-small takes well under 1 s


@dataclass(frozen=True)
class Cluster:
    trainer: LiveService
    single: LiveService  # SSD_ROLE=server, one process
    workers: LiveService  # SSD_ROLE=server, python -m app with two worker processes
    metrics_dir: Path  # the workers' PROMETHEUS_MULTIPROC_DIR

    @property
    def servers(self) -> tuple[LiveService, LiveService]:
        return self.single, self.workers


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("replicas")
    shared = root / "trainer" / "checkpoints"
    metrics_dir = root / "prometheus-multiproc"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"left by an earlier run")  # the parent must remove it
    server_env = {"SSD_ROLE": "server", "SSD_CHECKPOINT_DIR": str(shared), "SSD_RELOAD_INTERVAL": RELOAD_INTERVAL_S}
    with contextlib.ExitStack() as stack:
        # the trainer first: it writes version 0 at start, so the servers start synced (ready)
        # gated publishing (the default), every image trained on: one version per job
        trainer = stack.enter_context(run_service(root / "trainer", SSD_ROLE="trainer", SSD_HOLDOUT_FRACTION="0"))
        single = stack.enter_context(run_service(root / "single", **server_env))
        workers = stack.enter_context(run_service(
            root / "workers", module=True, SSD_WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), **server_env))
        yield Cluster(trainer, single, workers, metrics_dir)


def detect_version(service: LiveService, image: str) -> int:
    response = httpx.post(f"{service.url}/detect", json={"images": [{"image": image}]}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def wait_for_version(server: LiveService, image: str, version: int) -> None:
    """Until four /detect answers in a row name `version` (a two-worker server's processes poll on their own)."""
    deadline = time.monotonic() + PICKUP_TIMEOUT_S
    while [detect_version(server, image) for _ in range(4)] != [version] * 4:
        assert time.monotonic() < deadline, f"{server.url} not on version {version} after {PICKUP_TIMEOUT_S} s"
        time.sleep(0.2)


def score(service: LiveService, images: list[dict]) -> dict:
    response = httpx.post(f"{service.url}/score-loss", json={"images": images}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_servers_refuse_fine_tuning_and_model_changes(cluster):
    images = labelled_images(2, seed=1)
    for server in cluster.servers:
        for method, path, body in [("POST", "/finetune", {"images": images}), ("GET", "/finetune/abc", None),
                                   ("DELETE", "/finetune/abc", None), ("POST", "/model/checkpoint", None),
                                   ("POST", "/model/rollback", {"version": 0})]:
            response = httpx.request(method, f"{server.url}{path}", json=body, timeout=30)
            assert response.status_code == 409, (server.url, path, response.text)
            error = response.json()["error"]
            assert error["code"] == "wrong_role" and "SSD_ROLE=server" in error["message"]
        assert httpx.get(f"{server.url}/model", timeout=10).json()["role"] == "server"
    assert httpx.get(f"{cluster.trainer.url}/model", timeout=10).json()["role"] == "trainer"


def test_a_fine_tune_on_the_trainer_reaches_both_servers(cluster):
    images = labelled_images(2, seed=2)
    image = images[0]["image"]
    start = detect_version(cluster.trainer, image)
    for server in cluster.servers:
        wait_for_version(server, image, start)  # (already there unless another test fine-tuned just before)
    job = httpx.post(f"{cluster.trainer.url}/finetune", params={"wait": "true"},
                     json={"images": images, "steps": 2}, timeout=120).json()
    job_returned = time.monotonic()  # the job's checkpoint is on disk by now
    assert job["status"] == "succeeded", job
    new = job["model_version"]
    assert new == start + 1 and [step["model_version"] for step in job["losses"]] == [start, start]
    trained = score(cluster.trainer, images)
    assert trained["model_version"] == new
    for server in cluster.servers:
        wait_for_version(server, image, new)
        print(f"{server.url} on version {new} {time.monotonic() - job_returned:.2f} s after the job returned")
        served = score(server, images)
        assert served["model_version"] == new
        assert served["loss"] == pytest.approx(trained["loss"], rel=1e-5)  # the same weights as the trainer's
        assert httpx.get(f"{server.url}/model", timeout=10).json()["version"] == new


def requests_counted(service: LiveService, route: str) -> float:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "ssd_http_requests_total" and sample.labels.get("route") == route)


def requests_by_process(metrics_dir: Path, route: str) -> dict[str, float]:
    """pid -> requests on `route` counted by that worker process (its own counter file)."""
    counts: dict[str, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = path.stem.removeprefix("counter_")
        for family in MultiProcessCollector.merge([str(path)]):
            for sample in family.samples:
                if sample.name == "ssd_http_requests_total" and sample.labels.get("route") == route:
                    counts[pid] = counts.get(pid, 0.0) + sample.value
    return counts


def test_metrics_count_the_requests_of_every_worker_process(cluster):
    """K requests to the two-worker server: /metrics (answered by either worker) counts all K."""
    assert not (cluster.metrics_dir / "counter_999999.db").exists()  # cleaned by the parent at start
    images = labelled_images(1, seed=3)
    before = requests_counted(cluster.workers, "/score-loss")
    before_by_process = requests_by_process(cluster.metrics_dir, "/score-loss")
    sent = 0
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(4) as pool:  # concurrent connections, so the kernel hands them to both workers
        while True:
            list(pool.map(lambda _: score(cluster.workers, images), range(8)))
            sent += 8
            after_by_process = requests_by_process(cluster.metrics_dir, "/score-loss")
            serving = [pid for pid, count in after_by_process.items() if count > before_by_process.get(pid, 0.0)]
            if len(serving) >= 2 or time.monotonic() > deadline:
                break
    assert len(serving) == 2, f"only worker(s) {serving} served /score-loss"
    for _ in range(3):  # each scrape may be answered by either worker: all must see the same total
        assert requests_counted(cluster.workers, "/score-loss") - before == sent


def test_the_proxy_sends_training_to_the_trainer_and_inference_to_the_servers(cluster, tmp_path):
    images = labelled_images(2, seed=4)
    before = {service.url: requests_counted(service, "/detect") for service in (cluster.trainer, cluster.single)}
    with run_proxy(tmp_path / "nginx", cluster.trainer.host_port, cluster.single.host_port) as proxy:
        job = httpx.post(f"{proxy}/finetune", params={"wait": "true"}, json={"images": images}, timeout=120)
        assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text
        job_id = job.json()["job_id"]
        assert httpx.get(f"{proxy}/finetune/{job_id}", timeout=10).json()["status"] == "succeeded"
        cancel = httpx.delete(f"{proxy}/finetune/{job_id}", timeout=10)  # the trainer's answer, not wrong_role
        assert cancel.status_code == 409 and cancel.json()["error"]["code"] == "job_finished", cancel.text
        saved = httpx.post(f"{proxy}/model/checkpoint", timeout=60)
        assert saved.status_code == 200 and saved.json()["version"] == job.json()["model_version"], saved.text
        assert httpx.get(f"{proxy}/validation", timeout=10).status_code == 200  # the trainer's set
        pin = f"{proxy}/model/versions/{saved.json()['version']}/pin"
        pinned = httpx.post(pin, timeout=10)
        assert pinned.status_code == 200 and pinned.json()["pinned"] is True, pinned.text
        unpinned = httpx.delete(pin, timeout=10)
        assert unpinned.status_code == 200 and unpinned.json()["pinned"] is False, unpinned.text
        assert httpx.get(f"{proxy}/model", timeout=10).json()["role"] == "server"
        assert httpx.get(f"{proxy}/model/versions", timeout=10).status_code == 200
        for _ in range(3):
            detected = httpx.post(f"{proxy}/detect", json={"images": [{"image": images[0]["image"]}]}, timeout=30)
            assert detected.status_code == 200, detected.text
    assert requests_counted(cluster.single, "/detect") - before[cluster.single.url] == 3
    assert requests_counted(cluster.trainer, "/detect") == before[cluster.trainer.url]
