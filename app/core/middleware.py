"""Pure-ASGI middleware: request body limit (413) and per-route request metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.metrics import Metrics


class BodyTooLarge(Exception):
    """Raised from `receive` once the streamed body passes the limit."""


async def _send_error(send: Send, status: int, code: str, message: str, field: str | None) -> None:
    body = json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Answer 413 to bodies over `max_bytes`: the Content-Length up front, then the streamed bytes.

    A streamed body that passes the limit makes `receive` raise; whatever the application then
    answers is replaced by the 413, so no handler ever sees a truncated body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the application's answer to the cut-off body is replaced below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._too_large(send)

    async def _too_large(self, send: Send) -> None:
        message = f"request body exceeds the limit of {self.max_bytes} bytes"
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
