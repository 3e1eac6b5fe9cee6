"""/docs (Swagger UI) and /redoc (ReDoc) render in a real headless Chromium with no network but loopback:
every operation of /openapi.json appears, so the pages work where the CDN cannot be reached; and "Try it
out" on POST /detect, executed with the page's own example, gets a 200."""

from __future__ import annotations

import json
import re
import subprocess
import time

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

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


# ---- "Try it out" in Swagger UI, driven over the DevTools protocol

TRY_IT_OUT_TIMEOUT_S = 120

# One step of the interaction per call: open /detect's block, press "Try it out", press "Execute" (with the
# page's own example body), then read the status of the server response Swagger UI shows.
TRY_DETECT_JS = """(() => {
  const path = [...document.querySelectorAll('.opblock-post .opblock-summary-path')]
    .find(e => e.getAttribute('data-path') === '/detect');
  if (!path) return 'loading';
  const block = path.closest('.opblock');
  if (!block.classList.contains('is-open')) {
    (block.querySelector('.opblock-summary-control') || path).click(); return 'opening';
  }
  const tryOut = block.querySelector('.try-out__btn');
  if (tryOut && tryOut.textContent.includes('Try it out')) { tryOut.click(); return 'trying'; }
  const execute = block.querySelector('.btn.execute');
  if (execute && !window.__executed) { window.__executed = true; execute.click(); return 'executing'; }
  const status = block.querySelector('.live-responses-table tbody .response-col_status');
  const body = block.querySelector('.live-responses-table tbody .response-col_description pre');
  return status ? JSON.stringify({status: status.textContent.trim(), body: body ? body.textContent : ''}) : 'waiting';
})()"""


class DevTools:
    """A minimal DevTools-protocol client of one page: commands by id, events ignored."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def test_try_it_out_on_detect_succeeds_with_the_documented_example(live_service, tmp_path):
    chromium = require_tool("chromium")
    profile = tmp_path / "profile"
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--host-resolver-rules={OFFLINE}", "--remote-debugging-port=0",
         "--remote-allow-origins=*", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.monotonic() < deadline and browser.poll() is None, "chromium did not open its DevTools port"
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=2**26, open_timeout=30) as socket:
            devtools = DevTools(socket)
            devtools.call("Page.navigate", url=f"{live_service.url}/docs")
            deadline = time.monotonic() + TRY_IT_OUT_TIMEOUT_S
            steps = []
            while time.monotonic() < deadline:
                step = devtools.evaluate(TRY_DETECT_JS)
                if steps[-1:] != [step]:
                    steps.append(step)
                if step and step.startswith("{"):
                    break
                time.sleep(0.5)
        assert steps and steps[-1].startswith("{"), steps
        answer = json.loads(steps[-1])
        assert answer["status"] == "200", answer
        assert '"detections"' in answer["body"] and '"model_version"' in answer["body"], answer
    finally:
        browser.terminate()
        browser.wait(timeout=30)
