"""The real server process: uvicorn on a free loopback port, driven over HTTP, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.app.conftest import labelled

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "SSD_MODEL": "ssd-small", "SSD_NUM_CLASSES": "4", "SSD_CHECKPOINT_DIR": str(checkpoint_dir),
           "SSD_PORT": str(port), "SSD_HOST": "127.0.0.1", "SSD_TORCH_THREADS": "1", "SSD_SHUTDOWN_TIMEOUT_S": "20",
           # the unprotected mode: every step publishes (the gated default: test_gate_server.py)
           "SSD_PUBLISH": "every_step", "SSD_HOLDOUT_FRACTION": "0"}
    process = subprocess.Popen(  # `python -m app` runs uvicorn.run("app.main:app", ...)
        [sys.executable, "-m", "app"],
        cwd=REPO, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"server not ready after 60 s:\n{log.read_text()}")


def stop(process: subprocess.Popen, log: Path, bound: float = 30) -> float:
    """SIGTERM; returns the seconds until exit, asserting exit status 0 within `bound`."""
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"no exit {bound} s after SIGTERM:\n{log.read_text()}")
    assert code == 0, log.read_text()
    return time.monotonic() - start


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_live_server_trains_detects_exports_metrics_and_stops_on_sigterm(tmp_path, shapes):
    log = tmp_path / "server.log"
    process, url = start_server(tmp_path / "checkpoints", log)
    try:
        before = scrape(url)
        with httpx.Client(base_url=url, timeout=60) as http:
            job = http.post("/finetune", params={"wait": "true"},
                            json={"images": labelled(shapes), "steps": 2, "learning_rate": 0.002}).json()
            assert job["status"] == "succeeded" and job["model_version"] == 2, job
            detection = http.post("/detect", json={"images": [{"image": labelled(shapes)[0]["image"]}]})
            assert detection.status_code == 200 and detection.json()["model_version"] == 2
        after = scrape(url)
        assert before["ssd_model_version", ()] == 0 and after["ssd_model_version", ()] == 2
        assert after["ssd_finetune_steps_total", ()] - before["ssd_finetune_steps_total", ()] == 2
        assert after["ssd_loss_loc_count", (("source", "finetune"),)] == 2
        assert after["ssd_images_processed_total", (("route", "/detect"),)] == 1
        assert after["ssd_http_requests_total", (("method", "POST"), ("route", "/finetune"), ("status", "200"))] == 1
        assert after["ssd_finetune_jobs_total", (("state", "succeeded"),)] == 1

        # SIGTERM while a long job runs: the current step finishes, the version is saved, exit 0
        with httpx.Client(base_url=url, timeout=30) as http:
            long_job = http.post("/finetune", json={"images": labelled(shapes), "steps": 150}).json()
            while http.get(f"/finetune/{long_job['job_id']}").json()["steps_done"] < 2:
                time.sleep(0.05)
        assert stop(process, log) < 30
    finally:
        if process.poll() is None:
            process.kill()

    process, url = start_server(tmp_path / "checkpoints", log)
    try:
        version = httpx.get(f"{url}/model").json()["version"]
        assert 4 <= version < 2 + 150  # resumed from the checkpoint written at shutdown
        assert httpx.get(f"{url}/model/versions").json()["versions"][-1]["version"] == version
        interrupted = httpx.get(f"{url}/finetune/{long_job['job_id']}").json()  # from the job journal
        assert interrupted["status"] == "cancelled" and interrupted["error"] == "server shutting down"
        assert interrupted["model_version"] == version
        assert httpx.get(f"{url}/finetune/{job['job_id']}").json()["status"] == "succeeded"
    finally:
        stop(process, log)
