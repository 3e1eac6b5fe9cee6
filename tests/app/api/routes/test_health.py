"""GET /healthz, /readyz and the replica roles."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import assert_error, labelled, make_settings, start_client


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_not_ready_before_the_model_is_loaded(settings):
    client = TestClient(create_app(settings))  # no `with`: the lifespan has not run
    assert client.get("/healthz").status_code == 200
    assert_error(client.get("/readyz"), 503, None, "not_ready")
    assert_error(client.post("/detect", json={"images": []}), 503, None, "not_ready")


def test_not_ready_once_the_trainer_stopped(client):
    client.app.state.worker.stop(timeout=5)
    assert_error(client.get("/readyz"), 503, None, "not_ready")
    assert_error(client.post("/finetune", json={"images": []}), 503, None, "no_trainer")


def test_server_role_serves_the_trainers_checkpoint_and_refuses_training(tmp_path, shapes):
    with start_client(make_settings(tmp_path)):  # a trainer writes version 0 to the shared directory
        pass
    with start_client(make_settings(tmp_path, role="server")) as client:
        assert client.get("/readyz").status_code == 200
        assert client.get("/model").json()["role"] == "server"
        assert client.post("/score-loss", json={"images": labelled(shapes)}).status_code == 200
        assert_error(client.post("/finetune", json={"images": labelled(shapes)}), 409, None, "wrong_role")
        assert_error(client.post("/model/checkpoint"), 409, None, "wrong_role")


def test_openapi_documents_every_endpoint_and_body(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path, method in [("/score-loss", "post"), ("/finetune", "post"), ("/finetune/{job_id}", "get"),
                         ("/finetune/{job_id}", "delete"), ("/detect", "post"), ("/model", "get"),
                         ("/model/versions", "get"), ("/model/checkpoint", "post"), ("/model/rollback", "post"),
                         ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get")]:
        assert method in paths[path], (path, method)
    content = paths["/score-loss"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "application/octet-stream"}
    assert set(paths["/finetune"]["post"]["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    components = schema["components"]["schemas"]
    for model in ("ScoreLossRequest", "FinetuneRequest", "DetectRequest", "LossOptions", "ErrorResponse"):
        assert model in components
    assert client.get("/docs").status_code == 200


def test_docs_pages_load_their_assets_from_the_service(client):
    """/docs and /redoc reference only the service's own URLs (no CDN), and each of those answers."""
    for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = client.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        urls = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert any(url.endswith(asset) for url in urls), urls
        for url in urls:
            assert url.startswith("/"), f"{page} loads {url} from outside the service"
            fetched = client.get(url)
            assert fetched.status_code == 200 and len(fetched.content) > 1000, url
        assert "'/openapi.json'" in html.text or '"/openapi.json"' in html.text
