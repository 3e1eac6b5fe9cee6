"""/docs (Swagger UI) and /redoc (ReDoc) render in a real headless Chromium with no network but loopback:
every operation of /openapi.json appears, so the pages work where the CDN cannot be reached."""

from __future__ import annotations

import re
import subprocess

import httpx
import pytest

from tests.integration.live import LiveService, require_tool

pytestmark = pytest.mark.integration

# Every host but the loopback service resolves to nothing: a page that still loads its assets from a CDN
# renders no operation and fails the test.
OFFLINE = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
RENDER_BUDGET_MS = 20_000  # virtual time: the page's scripts run until idle or until this budget is spent


def rendered_dom(url: str, profile) -> str:
    """The DOM of `url` after its scripts ran, from `chromium --headless --dump-dom`."""
    chromium = require_tool("chromium")
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--host-resolver-rules={OFFLINE}",
        f"--virtual-time-budget={RENDER_BUDGET_MS}", "--dump-dom", url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def operations(service: LiveService) -> list[tuple[str, str, str]]:
    """(method, path, operationId) of every documented operation."""
    schema = httpx.get(f"{service.url}/openapi.json", timeout=10).json()
    found = [(method, path, op["operationId"]) for path, item in schema["paths"].items()
             for method, op in item.items()]
    assert len(found) >= 12, found  # score-loss, finetune x3, detect, model x4, health x3
    return found


def test_swagger_ui_renders_every_operation(live_service, tmp_path):
    dom = rendered_dom(f"{live_service.url}/docs", tmp_path / "profile")
    shown = re.findall(r'class="opblock opblock-(\w+).*?data-path="([^"]+)"', dom, flags=re.DOTALL)
    expected = [(method, path) for method, path, _ in operations(live_service)]
    assert sorted(shown) == sorted(expected), dom[:2000]
    assert "Failed to load API definition" not in dom


def test_redoc_renders_every_operation(live_service, tmp_path):
    dom = rendered_dom(f"{live_service.url}/redoc", tmp_path / "profile")
    for _, _, operation_id in operations(live_service):
        assert f"operation/{operation_id}" in dom, operation_id
    assert "Something went wrong" not in dom
