"""app.core.middleware: the body limits (size and stall) on a bare ASGI application."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.core.metrics import Metrics
from app.core.middleware import BodyLimitMiddleware

STALL_S = 0.2


async def echo_length(request: Request) -> JSONResponse:
    return JSONResponse({"length": len(await request.body())})


def limited(max_bytes: int = 1024) -> tuple[BodyLimitMiddleware, Metrics]:
    metrics = Metrics(CollectorRegistry(), ["a"])
    app = Starlette(routes=[Route("/", echo_length, methods=["POST"])])
    return BodyLimitMiddleware(app, max_bytes=max_bytes, stall_timeout_s=STALL_S, metrics=metrics), metrics


async def call(app: BodyLimitMiddleware, chunks: list[tuple[float, bytes]], *, stall_after: bool) -> list[dict]:
    """POST `chunks` (delay before each, bytes); `stall_after`: then send nothing, ever."""
    pending = list(chunks)
    sent: list[dict] = []

    async def receive() -> dict:
        if pending:
            delay, data = pending.pop(0)
            await asyncio.sleep(delay)
            return {"type": "http.request", "body": data, "more_body": bool(pending) or stall_after}
        await asyncio.Event().wait()  # a stalled client: no byte, no disconnect
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("test", 80), "root_path": ""}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


def answer(sent: list[dict]) -> tuple[int, dict, dict]:
    start, body = sent[0], sent[1]
    return start["status"], dict(start["headers"]), json.loads(body["body"])


def test_a_stalled_body_is_dropped_with_408_and_counted():
    app, metrics = limited()
    status, headers, body = answer(asyncio.run(call(app, [(0, b"{\"images\": [")], stall_after=True)))
    assert status == 408 and body["error"]["code"] == "body_stalled" and body["error"]["field"] == "body"
    assert "SSD_BODY_STALL_TIMEOUT_S" in body["error"]["message"] and "after 12 bytes" in body["error"]["message"]
    assert headers[b"connection"] == b"close"  # the connection and its slot are freed
    assert metrics.http_stalled_bodies._value.get() == 1


def test_a_slow_but_steady_body_passes():
    """The bound is between chunks, not on the whole upload: 6 chunks 0.1 s apart take 3 x the bound."""
    app, metrics = limited()
    status, _, body = answer(asyncio.run(call(app, [(STALL_S / 2, b"x" * 10)] * 6, stall_after=False)))
    assert (status, body) == (200, {"length": 60})
    assert metrics.http_stalled_bodies._value.get() == 0


def test_a_body_past_the_size_limit_is_still_413():
    app, metrics = limited(max_bytes=1024)
    status, _, body = answer(asyncio.run(call(app, [(0, b"x" * 1000), (0, b"x" * 100)], stall_after=False)))
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert metrics.http_stalled_bodies._value.get() == 0


@pytest.mark.parametrize("declared", [b"12x", b"-1"])
def test_a_malformed_content_length_is_400(declared):
    app, _ = limited()
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", declared)],
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("test", 80), "root_path": ""}
    asyncio.run(app(scope, None, send))
    assert answer(sent)[0] == 400
