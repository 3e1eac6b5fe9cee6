"""app.api.errors and the middleware: one JSON error shape, field paths, 404/405/413/415 and 500."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.api.errors import field_path, from_service_error
from app.core.errors import (
    ClientGone,
    Conflict,
    InvalidValue,
    JobQueueFull,
    NotFound,
    ServiceError,
    Unavailable,
)
from app.main import create_app
from tests.app.conftest import assert_error, make_settings


def test_field_path():
    assert field_path(("body", "images", 2, "boxes", 0)) == "images[2].boxes[0]"
    assert field_path(("version",)) == "version"
    assert field_path(("body",)) == "body"
    assert field_path((0, "labels"), prefix="annotations") == "annotations[0].labels"


def test_each_domain_error_kind_has_its_status():
    cases = [(InvalidValue("steps", "too many"), 422), (NotFound("not_found", "no job"), 404),
             (Conflict("trainer_busy", "busy"), 409), (JobQueueFull("queue_full", "full", retry_after_s=5), 429),
             (Unavailable("shutting_down", "stopping"), 503), (ClientGone("client_closed_request", "gone"), 499)]
    for error, status in cases:
        answer = from_service_error(error)
        assert (answer.status, answer.code, answer.message, answer.field) == (
            status, error.code, error.message, error.field)
    assert from_service_error(cases[0][0]).message == "steps: too many"
    assert from_service_error(cases[3][0]).headers == {"Retry-After": "5"}
    assert from_service_error(cases[1][0]).headers is None


def test_a_domain_error_of_no_known_kind_is_a_server_error():
    assert from_service_error(ServiceError("odd", "no kind")).status == 500


def test_framework_errors_use_the_shape(client):
    assert "/nowhere" in assert_error(client.get("/nowhere"), 404, "path", "not_found")["message"]
    wrong = assert_error(client.put("/model"), 405, "method", "method_not_allowed")
    assert wrong["message"] == "method PUT is not allowed on /model; allowed: GET"
    assert_error(client.post("/detect", content=b"x", headers={"Content-Type": "text/plain"}), 415, "Content-Type")
    assert_error(client.post("/model/rollback", json={"version": "latest"}), 422, "version", "invalid_value")


def test_declared_length_over_the_limit_is_refused_before_reading(client):
    response = client.post("/detect", content=b"{}", headers={"Content-Type": "application/json",
                                                                "Content-Length": str(10**10)})
    assert_error(response, 413, "body", "body_too_large")
    bogus = client.post("/detect", content=b"{}", headers={"Content-Length": "a lot"})
    assert_error(bogus, 400, "Content-Length")


def test_streamed_multipart_over_the_limit(client):
    files = [("images", ("a.png", b"\x89PNG" + b"0" * (5 * 2**20), "image/png"))]  # 5 MiB > 4 MiB
    assert_error(client.post("/detect", files=files), 413, "body", "body_too_large")
    assert client.get("/readyz").status_code == 200


def test_unexpected_errors_are_500_with_the_shape(tmp_path):
    app = create_app(make_settings(tmp_path))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("kaput")

    with TestClient(app, raise_server_exceptions=False) as client:
        error = assert_error(client.get("/boom"), 500, None, "internal_error")
        assert "kaput" not in error["message"]  # internals are logged, not returned


def test_validation_errors_list_every_error(client):
    response = client.post("/finetune", json={"images": [], "steps": 0, "learning_rate": -1, "bogus": 1})
    error = assert_error(response, 422, "steps", "invalid_value")
    assert error["message"].startswith("3 errors: steps: ")
    for field in ("steps", "learning_rate", "bogus"):
        assert f"{field}: " in error["message"], error
    assert "more errors" not in error["message"]
