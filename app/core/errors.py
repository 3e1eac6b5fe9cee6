"""The service's domain exceptions: what went wrong, in words a client can act on, without HTTP.

Code below `app.api` (the serving and online sides) raises these; `app.api.errors` alone maps each kind
to its HTTP status and the one JSON error shape `{"error": {"code", "message", "field"}}`.
`code` is that shape's `code`, `field` names the offending part of the request (or is None), and
`retry_after_s`, when set, says how soon the same request may succeed.
"""

from __future__ import annotations

import re


class ServiceError(Exception):
    """A failure of one request that the client can act on."""

    def __init__(self, code: str, message: str, field: str | None = None, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s


class InvalidValue(ServiceError):
    """The request parsed, but the value at `field` cannot be used (the message says why and what can)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__("invalid_value", f"{field}: {message}", field)


class NotFound(ServiceError):
    """The request names something (a job, a version) that does not exist."""


class Conflict(ServiceError):
    """The request cannot be carried out in the service's present state (a running job, a finished job,
    the wrong role, no checkpoint directory); retrying the same request unchanged does not help."""


class JobQueueFull(ServiceError):
    """The fine-tune queue is full; the same request may succeed after `retry_after_s`."""


class Unavailable(ServiceError):
    """The service cannot take the request now (shutting down, inference queue full)."""


class ClientGone(ServiceError):
    """The client closed the connection before its answer was ready."""


_DIRECTORIES = re.compile(r"(?<![\w.])/(?:[^\s'\":/]+/)+")  # an absolute path up to its last /


def without_paths(message: str) -> str:
    """`message` with every absolute path cut to its file name: errors of the checkpoint store and the
    OS name files by absolute path, and a client must not learn the server's file system.

    "/var/lib/ssd/ckpt-00000002.json: no such checkpoint" -> "ckpt-00000002.json: no such checkpoint".
    """
    return _DIRECTORIES.sub("", message)


def describe(error: BaseException) -> str:
    """`Type: message` of an exception, fit for a client (no absolute paths)."""
    return without_paths(f"{type(error).__name__}: {error}")
