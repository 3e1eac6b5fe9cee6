"""One JSON error shape for every failure: `{"error": {"code", "message", "field"}}`.

`field` names the offending part of the request (`predictions.loc`, `images[2].boxes[0]`, `body`,
`Authorization`, ...) or is null when no single field is at fault.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import (
    ClientGone,
    Conflict,
    InvalidValue,
    JobQueueFull,
    NotFound,
    ServiceError,
    Unavailable,
)

logger = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx response."""

    error: ErrorDetail


class ApiError(Exception):
    """An error answered with `status` and the JSON error shape."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def invalid(field: str, message: str) -> ApiError:
    """A 422 for a request that parsed but holds an unusable value at `field`."""
    return ApiError(422, "invalid_value", f"{field}: {message}", field)


def field_path(loc: Sequence[str | int], prefix: str = "") -> str:
    """`("body", "images", 2, "boxes", 0)` -> `images[2].boxes[0]`; drops FastAPI's `body` root."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    path = prefix
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


def from_validation_error(errors: Sequence[dict], prefix: str = "") -> ApiError:
    """Map pydantic/FastAPI validation errors to one ApiError: `field` names the first offending field,
    the message lists every error (`a: msg; b[1]: msg`), so a client fixes them all in one round."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, "invalid_json", f"body is not valid JSON: {first.get('msg')}", "body")
    fields = [field_path(error.get("loc", ()), prefix) for error in errors]
    listed = "; ".join(f"{field}: {error.get('msg')}" for field, error in zip(fields, errors, strict=True))
    message = listed if len(errors) == 1 else f"{len(errors)} errors: {listed}"
    return ApiError(422, "invalid_value", message, fields[0])


# The one place a domain exception becomes an HTTP status.
_STATUS_OF: dict[type[ServiceError], int] = {
    InvalidValue: 422, NotFound: 404, Conflict: 409, JobQueueFull: 429, Unavailable: 503, ClientGone: 499,
}


def from_service_error(error: ServiceError) -> ApiError:
    """The HTTP answer to a domain exception: its kind's status (500 for a kind with none), `Retry-After`
    when the error gives one."""
    status = next((_STATUS_OF[kind] for kind in type(error).__mro__ if kind in _STATUS_OF), 500)
    headers = None if error.retry_after_s is None else {"Retry-After": str(error.retry_after_s)}
    return ApiError(status, error.code, error.message, error.field, headers)


def _response(error: ApiError) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(code=error.code, message=error.message, field=error.field))
    return JSONResponse(body.model_dump(), status_code=error.status, headers=error.headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "body_too_large", 415: "unsupported_media_type"}
_HTTP_FIELDS = {400: "body", 404: "path", 405: "method", 413: "body", 415: "Content-Type"}


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type the service can raise to the one JSON error shape."""

    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _response(exc)

    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _response(from_service_error(exc))

    async def request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _response(from_validation_error(exc.errors()))

    async def model_validation(_: Request, exc: ValidationError) -> JSONResponse:
        return _response(from_validation_error(exc.errors()))

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message, field = str(exc.detail), _HTTP_FIELDS.get(exc.status_code)
        if exc.status_code == 404 and message == "Not Found":  # the router's own 404: no such path
            message = f"no route {request.url.path}; the operations are listed at /docs and /openapi.json"
        elif exc.status_code == 405:
            allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "")
            message = f"method {request.method} is not allowed on {request.url.path}; allowed: {allowed}"
        return _response(ApiError(exc.status_code, code, message, field, exc.headers))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _response(ApiError(500, "internal_error", f"internal error: {type(exc).__name__}"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(ValidationError, model_validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
