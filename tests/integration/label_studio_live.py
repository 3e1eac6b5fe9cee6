"""A real, unmodified Label Studio (from PyPI, in its own venv) for the integration test and the benchmark.

`deploy/scripts/install-label-studio.sh` installs it into `.venv-label-studio` (idempotent; never fails:
without PyPI the caller skips, saying why). Its first start migrates a fresh SQLite database (45-90 s);
that data directory is kept, once stopped, as a template under `.label-studio-data/` (git-ignored), and
every later start copies it and is up in seconds. The user, its legacy token and the environment Label
Studio needs to reach a backend on loopback offline are set here (docs/LABEL_STUDIO.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.integration.live import REPO, _log_tail, _stop, free_port

INSTALL_SCRIPT = REPO / "deploy" / "scripts" / "install-label-studio.sh"
VENV = Path(os.environ.get("LABEL_STUDIO_VENV", REPO / ".venv-label-studio"))
TEMPLATE = REPO / ".label-studio-data" / "template"
USERNAME = "ssd-test@example.com"
PASSWORD = "ssd-test-password"
LEGACY_TOKEN = "ssd0test0legacy0token0000000000000000000"
START_TIMEOUT_S = 240.0  # a first start migrates SQLite: 45 s on a quiet machine, 90 s and more on a busy one

# A rectangle project over the synthetic shapes (the service's `shapes` classes).
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="rectangle"/><Label value="ellipse"/><Label value="triangle"/>
  </RectangleLabels>
</View>"""


def label_studio_environment(data_dir: Path) -> dict[str, str]:
    """What Label Studio needs here: reach a backend on loopback (ML_BLOCK_LOCAL_IP, SSRF_PROTECTION_ENABLED),
    stay offline (LATEST_VERSION_CHECK, empty SENTRY_DSN), its data directory and the user it creates."""
    return {
        **os.environ,
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "USERNAME": USERNAME,
        "PASSWORD": PASSWORD,
        "PYTHONWARNINGS": "ignore",
    }


def install() -> str | None:
    """Install Label Studio when missing; None when ready, else why not (for pytest.skip)."""
    binary = VENV / "bin" / "label-studio"
    if not binary.exists():
        result = subprocess.run([str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
        if not binary.exists():
            tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]
            return f"Label Studio is not installed and {INSTALL_SCRIPT.name} could not install it: {tail[0]}"
    return None


@dataclass(frozen=True)
class LiveLabelStudio:
    url: str
    log: Path
    process: subprocess.Popen

    def api(self, token: str = LEGACY_TOKEN, timeout_s: float = 120.0) -> httpx.Client:
        """A client of Label Studio's API with the test user's legacy token."""
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Token {token}"}, timeout=timeout_s)


def _start(data_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [str(VENV / "bin" / "label-studio"), "start", "--no-browser", "--port", str(port),
               "--internal-host", "127.0.0.1", "--data-dir", str(data_dir), "--username", USERNAME,
               "--password", PASSWORD, "--user-token", LEGACY_TOKEN, "--enable-legacy-api-token"]
    with log.open("ab") as log_file:
        process = subprocess.Popen(command, cwd=data_dir.parent, env=label_studio_environment(data_dir),
                                   stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Label Studio exited with {process.returncode}:\n{_log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            ready = httpx.get(f"{url}/api/current-user/whoami", timeout=5,
                              headers={"Authorization": f"Token {LEGACY_TOKEN}"})
            if ready.status_code == 200:
                return process, url
        time.sleep(0.5)
    _stop(process)
    raise RuntimeError(f"Label Studio not ready after {START_TIMEOUT_S:.0f} s:\n{_log_tail(log)}")


@contextlib.contextmanager
def run_label_studio(workdir: Path) -> Iterator[LiveLabelStudio]:
    """Start Label Studio on a copy of the migrated template (made by a first, slow start when missing)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "label-studio.log"
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    with (TEMPLATE.parent / "template.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process (a test worker, a benchmark) may be making it now
        if not (TEMPLATE / "label_studio.sqlite3").exists():
            fresh = TEMPLATE.with_name("template-in-progress")
            shutil.rmtree(fresh, ignore_errors=True)
            fresh.mkdir(parents=True)
            process, _ = _start(fresh, log)
            _stop(process)  # a clean stop: the SQLite file is complete
            shutil.rmtree(TEMPLATE, ignore_errors=True)
            fresh.rename(TEMPLATE)
    data_dir = workdir / "label-studio-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.copytree(TEMPLATE, data_dir)
    process, url = _start(data_dir, log)
    try:
        yield LiveLabelStudio(url, log, process)
    finally:
        _stop(process)
