"""The client of Label Studio (app.labelstudio.client) against an httpx MockTransport standing in for Label
Studio: both kinds of key, the access token's renewal, paging, and images fetched from Label Studio only."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest

from app.labelstudio.client import (
    LabelStudioClient,
    LabelStudioError,
    decode_data_url,
    is_personal_access_token,
)


def jwt(claims: dict) -> str:
    encode = lambda part: base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")  # noqa: E731
    return f"{encode({'alg': 'HS256', 'typ': 'JWT'})}.{encode(claims)}.c2lnbmF0dXJl"


REFRESH = jwt({"token_type": "refresh", "exp": time.time() + 1e6})


class FakeLabelStudio:
    """Answers what the client asks; records every request."""

    def __init__(self, access_lifetime_s: float = 300.0, tasks: int = 0) -> None:
        self.requests: list[httpx.Request] = []
        self.access_lifetime_s = access_lifetime_s
        self.issued: list[str] = []
        self.revoked: set[str] = set()
        self.tasks = [{"id": k, "annotations": [{"id": 100 + k}] if k % 2 else []} for k in range(tasks)]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path, auth = request.url.path, request.headers.get("authorization", "")
        if path == "/api/token/refresh/":
            assert json.loads(request.content) == {"refresh": REFRESH}
            self.issued.append(jwt({"token_type": "access", "n": len(self.issued),
                                    "exp": time.time() + self.access_lifetime_s}))
            return httpx.Response(200, json={"access": self.issued[-1]})
        valid = auth == "Token legacy-key" or (auth.startswith("Bearer ") and auth[7:] in self.issued
                                               and auth[7:] not in self.revoked)
        if not valid:
            return httpx.Response(401, json={"detail": "Authentication credentials were not provided."})
        if path == "/api/annotations/7/":
            return httpx.Response(200, json={"id": 7, "task": 3, "result": []})
        if path == "/api/tasks/":
            page, size = int(request.url.params["page"]), int(request.url.params["page_size"])
            return httpx.Response(200, json={"tasks": self.tasks[(page - 1) * size : page * size]})
        if path == "/data/upload/1/a.png":
            return httpx.Response(200, content=b"\x89PNG fake")
        return httpx.Response(404, json={"detail": "Not found."})


def client(fake: FakeLabelStudio, key: str = "legacy-key", **options) -> LabelStudioClient:
    return LabelStudioClient("http://ls.test:8080", key, transport=httpx.MockTransport(fake), **options)


def test_legacy_token():
    fake = FakeLabelStudio()
    assert client(fake).annotation(7) == {"id": 7, "task": 3, "result": []}
    assert fake.requests[0].headers["authorization"] == "Token legacy-key"
    assert client(fake).annotation(8) is None  # 404: Label Studio has no such annotation


def test_personal_access_token_refreshed_renewed_and_retried():
    assert is_personal_access_token(REFRESH) and not is_personal_access_token("legacy-key")
    fake = FakeLabelStudio()
    ls = client(fake, REFRESH)
    ls.annotation(7), ls.annotation(7)
    assert len(fake.issued) == 1  # one exchange while the access token is fresh
    fake.revoked.add(fake.issued[0])  # Label Studio no longer takes it: a 401, renewed once, retried
    assert ls.annotation(7)["id"] == 7 and len(fake.issued) == 2
    expiring = FakeLabelStudio(access_lifetime_s=5)  # within the renewal margin: renewed before each use
    ls = client(expiring, REFRESH)
    ls.annotation(7), ls.annotation(7)
    assert len(expiring.issued) == 2


def test_refused_refresh_token_is_an_error():
    fake = FakeLabelStudio()
    ls = LabelStudioClient("http://ls.test:8080", jwt({"exp": 1}), transport=httpx.MockTransport(
        lambda request: httpx.Response(401, json={})))
    with pytest.raises(LabelStudioError, match="personal access token"):
        ls.annotation(7)
    assert not fake.requests


def test_annotated_tasks_are_paged():
    fake = FakeLabelStudio(tasks=250)
    ids = [task["id"] for task in client(fake).annotated_tasks(4)]
    assert ids == list(range(1, 250, 2))
    assert [int(r.url.params["page"]) for r in fake.requests] == [1, 2, 3]
    assert {r.url.params["project"] for r in fake.requests} == {"4"}


def test_images_only_from_label_studio():
    fake = FakeLabelStudio()
    ls = client(fake, max_bytes=100)
    assert ls.image("/data/upload/1/a.png") == b"\x89PNG fake"
    assert ls.image("http://ls.test:8080/data/upload/1/a.png") == b"\x89PNG fake"
    assert ls.image("data:image/png;base64," + base64.b64encode(b"abc").decode()) == b"abc"
    for url in ("http://169.254.169.254/latest/meta-data", "https://ls.test:8080/data/upload/1/a.png",
                "//elsewhere.test/a.png"):
        with pytest.raises(LabelStudioError, match="not on Label Studio"):
            ls.image(url)
    assert all(r.url.host == "ls.test" and r.url.port == 8080 for r in fake.requests)  # the key went nowhere else
    with pytest.raises(LabelStudioError, match="404"):
        ls.image("/data/upload/1/missing.png")
    with pytest.raises(LabelStudioError, match="exceeds 4 bytes"):
        client(fake, max_bytes=4).image("/data/upload/1/a.png")


def test_data_urls():
    assert decode_data_url("data:text/plain,a%20b") == b"a b"
    with pytest.raises(ValueError, match="no comma"):
        decode_data_url("data:image/png;base64")
    with pytest.raises(ValueError, match="base64"):
        decode_data_url("data:image/png;base64,@@@")
