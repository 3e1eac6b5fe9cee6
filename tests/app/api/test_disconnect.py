"""The disconnect wait of an HTTP request returns at the client's disconnect, not at another message."""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from app.api.disconnect import wait_for_disconnect


def test_the_wait_returns_at_the_disconnect_message():
    messages = [{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}]
    received = []

    async def receive() -> dict:
        received.append(messages[len(received)])
        return received[-1]

    request = Request({"type": "http", "method": "POST", "path": "/detect", "headers": []}, receive)
    asyncio.run(wait_for_disconnect(request)())
    assert received == messages
