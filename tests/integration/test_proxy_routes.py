"""deploy/nginx/nginx.conf sends every trainer-only route to the trainer and every other to the servers.

The real nginx runs the file with its two backends pointed at stand-ins that answer any request with
their own name; every endpoint of the application's route table (tests/deploy/routes.py: the trainer's
are those depending on the trainer role) is sent through it with its own method. No model is loaded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.deploy.routes import SERVER, TRAINER, app_endpoints
from tests.integration.proxy import run_proxy

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def stand_in(name: str) -> Iterator[str]:
    """A backend on a free loopback port answering every method and path with 200 and `X-Backend: name`."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("X-Backend", name)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with stand_in(TRAINER) as trainer, stand_in(SERVER) as servers, \
            run_proxy(tmp_path_factory.mktemp("nginx"), trainer, servers) as url:
        yield url


def backend(proxy: str, method: str, path: str) -> str:
    response = httpx.request(method, f"{proxy}{path}", timeout=10)
    assert response.status_code == 200, (method, path, response.status_code)  # no redirect, no nginx error
    return response.headers["X-Backend"]


def test_every_endpoint_of_the_route_table_reaches_the_backend_of_its_role(proxy):
    endpoints = app_endpoints()
    assert {endpoint.role for endpoint in endpoints} == {TRAINER, SERVER}
    wrong = [f"{endpoint.method} {endpoint.template} -> {reached}" for endpoint in endpoints
             if (reached := backend(proxy, endpoint.method, endpoint.path)) != endpoint.role]
    assert not wrong, wrong


def test_the_label_studio_webhook_feeds_the_trainer_and_its_predictions_come_from_the_servers(proxy):
    assert backend(proxy, "POST", "/labelstudio/webhook") == TRAINER
    for method, path in (("POST", "/labelstudio/predict"), ("GET", "/labelstudio/health"),
                         ("POST", "/labelstudio/setup"), ("GET", "/labelstudio/versions")):
        assert backend(proxy, method, path) == SERVER
