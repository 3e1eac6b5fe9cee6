"""The service's requests to Label Studio (httpx): annotations, tasks, projects and task images.

Authenticates with SSD_LABEL_STUDIO_API_KEY, either form Label Studio 1.23 issues: a legacy token
(`Authorization: Token <key>`) or a personal access token, a JWT refresh token exchanged at
`POST /api/token/refresh/` for short-lived access tokens (`Authorization: Bearer <access>`), renewed
before they expire and once more on a 401. The key is sent to Label Studio's own origin only.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from collections.abc import Iterator
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import httpx

PAGE_SIZE = 100  # tasks per page when pulling a project's annotated tasks
_RENEW_BEFORE_S = 30.0  # an access token this close to its expiry is renewed first


class LabelStudioError(Exception):
    """Label Studio could not be asked, or answered something unusable (the message says which)."""


def is_personal_access_token(key: str) -> bool:
    """Whether `key` is a JWT (a personal access token) rather than a legacy token."""
    return key.count(".") == 2 and key.startswith("eyJ")


def jwt_expiry(token: str) -> float | None:
    """The `exp` (unix seconds) of a JWT's payload, read without verifying it; None when absent."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError, binascii.Error):
        return None


def decode_data_url(url: str) -> bytes:
    """The bytes of a `data:` URL (base64 or percent-encoded); ValueError when malformed."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise ValueError("malformed data URL: no comma")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as error:
            raise ValueError(f"malformed base64 in data URL: {error}") from None
    return unquote_to_bytes(payload)


class LabelStudioClient:
    """Thread-safe client of one Label Studio.

    Args:
        url: Label Studio's base URL (SSD_LABEL_STUDIO_URL), e.g. http://localhost:8080.
        api_key: legacy token or personal access token (SSD_LABEL_STUDIO_API_KEY).
        timeout_s: per request.
        max_bytes: the largest image fetched (larger: LabelStudioError).
        transport: for tests (an httpx transport).
    """

    def __init__(self, url: str, api_key: str, *, timeout_s: float = 10.0, max_bytes: int = 64 * 2**20,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/") + "/"
        self._origin = _origin(self.url)
        self._key = api_key
        self._max_bytes = max_bytes
        self._http = httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=False)
        self._lock = threading.Lock()
        self._access: tuple[str, float] | None = None  # (access token, expiry) for a personal access token

    def close(self) -> None:
        self._http.close()

    # ---- authentication

    def _authorization(self, renew: bool = False) -> str:
        if not is_personal_access_token(self._key):
            return f"Token {self._key}"
        with self._lock:
            if renew or self._access is None or self._access[1] - _RENEW_BEFORE_S < time.time():
                response = self._http.post(urljoin(self.url, "api/token/refresh/"), json={"refresh": self._key})
                if response.status_code != 200:
                    raise LabelStudioError(f"Label Studio refused the personal access token "
                                           f"(POST /api/token/refresh/: {response.status_code})")
                access = response.json().get("access")
                if not isinstance(access, str):
                    raise LabelStudioError("Label Studio's /api/token/refresh/ answered no access token")
                self._access = (access, jwt_expiry(access) or time.time() + 60.0)
            return f"Bearer {self._access[0]}"

    def _get(self, url: str, params: dict | None = None, stream: bool = False) -> httpx.Response:
        """GET with the key (on Label Studio's origin only), renewing an access token once on a 401."""
        try:
            response = self._send(url, params, stream, renew=False)
            if response.status_code == 401 and is_personal_access_token(self._key):
                response.close()
                response = self._send(url, params, stream, renew=True)
        except httpx.HTTPError as error:
            raise LabelStudioError(f"GET {_redacted(url)}: {type(error).__name__}: {error}") from None
        return response

    def _send(self, url: str, params: dict | None, stream: bool, renew: bool) -> httpx.Response:
        headers = {"Authorization": self._authorization(renew)} if _origin(url) == self._origin else {}
        request = self._http.build_request("GET", url, params=params, headers=headers)
        return self._http.send(request, stream=stream)

    def _json(self, path: str, params: dict | None = None) -> dict | None:
        """The JSON object at `path` of Label Studio's API; None on 404."""
        response = self._get(urljoin(self.url, path), params)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise LabelStudioError(f"GET /{path}: Label Studio answered {response.status_code}: "
                                   f"{response.text[:200]}")
        body = response.json()
        if not isinstance(body, dict):
            raise LabelStudioError(f"GET /{path}: expected a JSON object")
        return body

    # ---- the API

    def annotation(self, annotation_id: int) -> dict | None:
        """The annotation as Label Studio holds it, None when it has none of this id."""
        return self._json(f"api/annotations/{int(annotation_id)}/")

    def task(self, task_id: int) -> dict | None:
        return self._json(f"api/tasks/{int(task_id)}/")

    def project(self, project_id: int) -> dict | None:
        return self._json(f"api/projects/{int(project_id)}/")

    def annotated_tasks(self, project_id: int) -> Iterator[dict]:
        """The project's tasks that have annotations, with them, page by page."""
        page = 1
        while True:
            body = self._json("api/tasks/", {"project": int(project_id), "page": page, "page_size": PAGE_SIZE,
                                             "fields": "all"})
            tasks = (body or {}).get("tasks") or []
            for task in tasks:
                if task.get("annotations"):
                    yield task
            if len(tasks) < PAGE_SIZE:
                return
            page += 1

    def image(self, url: str) -> bytes:
        """A task's image: a data URL, a path on Label Studio (`/data/upload/...`) or an absolute URL on
        Label Studio's origin. Other hosts are refused: the service fetches only from Label Studio."""
        if url.startswith("data:"):
            try:
                return decode_data_url(url)
            except ValueError as error:
                raise LabelStudioError(str(error)) from None
        absolute = urljoin(self._origin + "/", url)
        if _origin(absolute) != self._origin:
            raise LabelStudioError(f"image URL {_redacted(absolute)} is not on Label Studio ({self._origin}); "
                                   "the service fetches task images from Label Studio only")
        response = self._get(absolute, stream=True)
        try:
            if response.status_code != 200:
                raise LabelStudioError(f"GET {_redacted(absolute)}: Label Studio answered {response.status_code}")
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > self._max_bytes:
                    raise LabelStudioError(f"image {_redacted(absolute)} exceeds {self._max_bytes} bytes")
            return bytes(data)
        except httpx.HTTPError as error:
            raise LabelStudioError(f"GET {_redacted(absolute)}: {type(error).__name__}: {error}") from None
        finally:
            response.close()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _redacted(url: str) -> str:
    """`url` without its query (which may carry signed-URL secrets), for messages."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
