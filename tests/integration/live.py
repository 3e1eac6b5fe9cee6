"""Helpers for tests that drive real outside tools against the live service.

The service runs as a real uvicorn process on a free loopback port (small model, temporary checkpoint
directory); Prometheus runs as the real Debian-packaged binary. Both are always stopped at the end.
A tool that is missing makes its tests skip with a message naming the install script.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "ssd-service.json"
INSTALL_HINT = "run deploy/scripts/install-tools.sh (installs Debian's prometheus, docker-compose, nginx and chromium)"
START_TIMEOUT_S = 120.0  # torch import + model build on a shared 2-core CPU
# Grafana's built-in interval variables, replaced the way Grafana would before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def require_tool(name: str) -> str:
    """Absolute path of `name` on PATH (or the sbin folders Debian puts daemons in, often off a
    non-root user's PATH), or skip the test saying how to install it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.skip(f"`{name}` is not installed and could not be installed here; {INSTALL_HINT}")
    return path


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "<no log>"


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 15 s: never leaves the process behind."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def _wait_until(check, timeout_s: float, process: subprocess.Popen, log: Path, what: str) -> None:
    """Poll `check()` until it returns True; fail with the process log if it dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with code {process.returncode}:\n{_log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.25)
    pytest.fail(f"{what} not ready after {timeout_s:.0f} s:\n{_log_tail(log)}")


@dataclass(frozen=True)
class LiveService:
    """A running service process."""

    url: str  # http://127.0.0.1:<port>
    host_port: str  # 127.0.0.1:<port>, as a Prometheus target
    log: Path
    process: subprocess.Popen  # for tests that signal or kill it


@contextlib.contextmanager
def run_service(workdir: Path, *, module: bool = False, **env: str) -> Iterator[LiveService]:
    """Start `uvicorn app.main:app` (small model, CPU, one thread) and stop it on exit.

    `module=True` runs the production entry point `python -m app` instead (exit status 0 after SIGTERM).
    Restarting with the same `workdir` resumes from its checkpoint directory; the log is appended to.
    """
    port = free_port()
    log = workdir / "service.log"
    checkpoints = workdir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    process_env = {
        **os.environ,
        "SSD_MODEL": "ssd-small",
        "SSD_NUM_CLASSES": "4",
        "SSD_DEVICE": "cpu",
        "SSD_CHECKPOINT_DIR": str(checkpoints),
        "SSD_PORT": str(port),
        "SSD_HOST": "127.0.0.1",
        "SSD_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "SSD_BACKEND": "torch",  # each start would export ONNX for seconds; the quick-start test serves the default
        **env,
    }
    command = [sys.executable, "-m", "app"] if module else [
        sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("ab") as log_file:
        process = subprocess.Popen(command, cwd=REPO, env=process_env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until(
            lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200,
            START_TIMEOUT_S, process, log, "the service",
        )
        yield LiveService(url=url, host_port=f"127.0.0.1:{port}", log=log, process=process)
    finally:
        _stop(process)


@dataclass(frozen=True)
class LivePrometheus:
    """A running Prometheus server scraping one target."""

    url: str
    job: str
    log: Path

    def query(self, expr: str, timeout_s: float = 10.0) -> list[dict]:
        """Instant query through the HTTP API; fails the test unless Prometheus says `success`."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=timeout_s)
        body = response.json()
        assert response.status_code == 200 and body.get("status") == "success", (expr, response.text)
        return body["data"]["result"]

    def wait_for_scrape_after(self, since: float, timeout_s: float = 30.0) -> None:
        """Wait until the samples of a scrape that started after unix time `since` are queryable.

        A target's lastScrape is set before that scrape's samples are committed, so wait for the
        scrape after it (the scrape loop is sequential: it starts after the previous commit).
        """
        first = self._scrape_started_after(since, timeout_s)
        self._scrape_started_after(first, timeout_s)

    def _scrape_started_after(self, since: float, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            targets = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            for target in targets:
                last = _rfc3339_to_unix(target["lastScrape"]) if target.get("lastScrape") else 0.0
                if target["health"] == "up" and last > since:
                    return last
            time.sleep(0.25)
        pytest.fail(f"Prometheus did not complete a scrape within {timeout_s} s:\n{_log_tail(self.log)}")


def _rfc3339_to_unix(stamp: str) -> float:
    """Prometheus's lastScrape (RFC 3339 with nanoseconds) as unix seconds."""
    from datetime import datetime

    stamp = re.sub(r"(\.\d{6})\d+", r"\1", stamp).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


@contextlib.contextmanager
def run_prometheus(workdir: Path, target: str, job: str = "ssd") -> Iterator[LivePrometheus]:
    """Start the real `prometheus` binary scraping `target` every second; stop it on exit."""
    binary = require_tool("prometheus")
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML: no extra dependency to write the config
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    log = workdir / "prometheus.log"
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=workdir, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until(lambda: httpx.get(f"{url}/-/ready", timeout=5).status_code == 200, 60, process, log, "prometheus")
        yield LivePrometheus(url=url, job=job, log=log)
    finally:
        _stop(process)


# ---- the contract files: metric names table and dashboard expressions --------------------------------

METRIC_ROW = re.compile(r"^\|\s*`(ssd_[a-z0-9_]+)`\s*\|\s*(counter|gauge|histogram|info)\s*\|")


def architecture_metrics() -> dict[str, str]:
    """Metric name -> type from docs/ARCHITECTURE.md's "Prometheus metric names" table."""
    rows = (METRIC_ROW.match(line) for line in ARCHITECTURE.read_text().splitlines())
    return {match.group(1): match.group(2) for match in rows if match}


def exposed_names(metrics: dict[str, str]) -> set[str]:
    """Sample names Prometheus stores for the table's metrics (prometheus_client's suffix rules)."""
    names: set[str] = set()
    for name, kind in metrics.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "counter":
            names.add(name if name.endswith("_total") else f"{name}_total")
        elif kind == "info":
            names.add(f"{name}_info")
        else:
            names.add(name)
    return names


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query target of the Grafana dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    return found


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's built-in interval variables as Grafana would; no other variable may remain."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


# ---- request bodies ------------------------------------------------------------------------------------


def labelled_images(count: int, seed: int, image_size: int = 96, **shapes: float) -> list[dict]:
    """`count` synthetic images as the service's labelled-image JSON: base64 PNG, pixel xyxy boxes, labels.

    `shapes` go to `ShapesDataset` (e.g. `min_size`, `max_size` as fractions of the image side).
    """
    from ssd_core.data.images import encode_png
    from ssd_core.data.synthetic import ShapesDataset

    dataset = ShapesDataset(count, image_size=image_size, seed=seed, max_objects=3, **shapes)
    return [
        {
            "image": base64.b64encode(encode_png(sample.image)).decode(),
            "boxes": sample.boxes.tolist(),
            "labels": sample.labels.tolist(),
        }
        for sample in (dataset[index] for index in range(count))
    ]
