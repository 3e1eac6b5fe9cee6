"""deploy/nginx/nginx.conf run by the real nginx, its backend names pointed at loopback addresses."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.integration.live import REPO, _stop, _wait_until, free_port, require_tool

NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"


@contextlib.contextmanager
def run_proxy(workdir: Path, trainer: str, servers: str) -> Iterator[str]:
    """nginx.conf with `trainer:8000` and `ssd-server:8000` replaced by `host:port` addresses; its URL.

    Ready once `/healthz` answers 200 through it (so the servers' backend must answer that).
    """
    binary = require_tool("nginx")
    port = free_port()
    config = NGINX_CONF.read_text()
    for name, target in (("trainer:8000", trainer), ("ssd-server:8000", servers),
                         ("listen 8080;", f"listen 127.0.0.1:{port};")):
        assert name in config, name
        config = config.replace(name, target)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "nginx.conf").write_text(config)
    log = workdir / "nginx.log"
    command = [binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", "stderr",
               "-g", f"daemon off; pid {workdir / 'nginx.pid'};"]
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until(lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, 30, process, log, "nginx")
        yield url
    finally:
        _stop(process)
