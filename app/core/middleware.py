"""Pure-ASGI middleware: request body limits (413 past a size, 408 when it stalls) and per-route request
metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.metrics import Metrics


class BodyRefused(Exception):
    """Raised from `receive` once the streamed body passes the size limit or stalls."""


async def _send_error(
    send: Send, status: int, code: str, message: str, field: str | None, *, close: bool = False
) -> None:
    body = json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the server closes the connection after the answer instead of waiting for the rest of the body
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Bound what a request body may cost: 413 past `max_bytes` (the Content-Length up front, then the
    streamed bytes), 408 `body_stalled` when no body bytes arrive for `stall_timeout_s` (counted in
    `ssd_http_stalled_bodies_total`; the connection is closed, freeing its slot).

    The stall bound applies between body chunks, so a slow but steady upload of a large body passes;
    once the body is complete, `receive` (which handlers await to notice a disconnect) is not bounded.
    A refused body makes `receive` raise; whatever the application then answers is replaced by the
    refusal, so no handler ever sees a truncated body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, stall_timeout_s: float, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.stall_timeout_s = stall_timeout_s
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_error(send, 400, "bad_request", "Content-Length is not a number", "Content-Length")
                return
            if int(declared) > self.max_bytes:
                await self._too_large(send)
                return
        received = 0
        body_done = False
        refusal: str | None = None  # "too_large" or "stalled"
        started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done, refusal
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(self.stall_timeout_s):  # a third of wait_for's cost: no task per chunk
                    message = await receive()
            except TimeoutError:
                refusal = "stalled"
                raise BodyRefused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    refusal = "too_large"
                    raise BodyRefused
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:
                return  # the application's answer to the cut-off body is replaced below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if refusal is None:
                raise
        if refusal is None or started:
            return
        if refusal == "too_large":
            await self._too_large(send)
            return
        self.metrics.http_stalled_bodies.inc()
        message = (f"no request body bytes for {self.stall_timeout_s:g} s after {received} bytes "
                   "(SSD_BODY_STALL_TIMEOUT_S); send the whole body without pausing")
        await _send_error(send, 408, "body_stalled", message, "body", close=True)

    async def _too_large(self, send: Send) -> None:
        message = f"request body exceeds the limit of {self.max_bytes} bytes (SSD_MAX_BODY_BYTES)"
        await _send_error(send, 413, "body_too_large", message, "body")


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The path template of the route `scope` reaches (bounded label values), else 'unmatched'."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route.path
        if match == Match.PARTIAL and partial is None:
            partial = route.path  # path matches, method does not (405)
    return partial or "unmatched"


class RequestMetricsMiddleware:
    """Count, time and track in-flight requests by route template, method and status.

    Args:
        routes: the flat list of the application's routes, matched up front so the in-flight
            gauge has its label before the handler runs.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_template(self.routes, scope)
        method = scope["method"] if scope["method"] in _METHODS else "other"
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        in_progress = self.metrics.http_requests_in_progress.labels(route=route, method=method)
        in_progress.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.http_request_duration.labels(route=route, method=method).observe(
                time.perf_counter() - start
            )
            self.metrics.http_requests.labels(route=route, method=method, status=str(status)).inc()
            in_progress.dec()
