"""The dependencies of app.api.deps: the Bearer token guards every mutating route, and only those."""

from __future__ import annotations

import pytest

from tests.app.conftest import TOKEN, assert_error, labelled, make_settings, start_client


@pytest.fixture
def secured(tmp_path):
    with start_client(make_settings(tmp_path, api_token=TOKEN)) as client:
        yield client


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": TOKEN}])
def test_mutating_endpoints_need_the_token(secured, shapes, headers):
    items = labelled(shapes, (0,))
    for method, path, body in [
        ("POST", "/finetune", {"images": items}),
        ("DELETE", "/finetune/whatever", None),
        ("POST", "/model/checkpoint", None),
        ("POST", "/model/rollback", {"version": 0}),
        ("POST", "/model/versions/0/pin", None),
        ("DELETE", "/model/versions/0/pin", None),
        ("POST", "/validation", {"images": items}),
        ("DELETE", "/validation", None),
    ]:
        response = secured.request(method, path, json=body, headers=headers)
        error = assert_error(response, 401, "Authorization", "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer", error
        assert "send the header `Authorization: Bearer <SSD_API_TOKEN>`" in error["message"], error  # its form
    assert secured.version == 0
    assert secured.sample("ssd_finetune_queue_depth") == 0
    assert secured.get("/model/versions").json()["versions"] == [{"version": 0, "step": 0, "pinned": False,
                                                                  "created": secured.get(
        "/model/versions").json()["versions"][0]["created"]}]
    assert secured.get("/validation").json()["images"] == 0


def test_the_right_token_is_accepted(secured, shapes):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    job = secured.post("/finetune?wait=true", json={"images": labelled(shapes)}, headers=auth)
    assert job.status_code == 200 and job.json()["status"] == "succeeded"
    assert secured.post("/model/checkpoint", headers=auth).status_code == 200
    assert secured.get(f"/finetune/{job.json()['job_id']}").status_code == 200  # reading needs no token
    assert secured.post("/score-loss", json={"images": labelled(shapes, (0,))}).status_code == 200
