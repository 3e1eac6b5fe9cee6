"""The one thing serving code needs of an HTTP request's connection: noticing that its client has gone."""

from __future__ import annotations

from starlette.requests import Request

from app.serving.inference import WaitForDisconnect


def wait_for_disconnect(request: Request) -> WaitForDisconnect:
    """An async function that returns once the client of `request` disconnects. Only for a request whose
    body has been read: the next message the server sends it is then the disconnect."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait
