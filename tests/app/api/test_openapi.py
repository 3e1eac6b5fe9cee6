"""/docs can be tried: every JSON request body of /openapi.json carries an example, and each example, sent
as it stands, succeeds against the service (what Swagger UI's "Try it out" sends)."""

from __future__ import annotations

import base64

import pytest

from app.api.openapi import BODY_EXAMPLES, example_image
from ssd_core.data.images import decode_image_bytes
from tests.app.conftest import make_settings, start_client


def json_bodies(schema: dict) -> list[tuple[str, str, dict]]:
    """(method, path, JSON content) of every operation that takes a JSON body."""
    return [(method, path, operation["requestBody"]["content"]["application/json"])
            for path, item in schema["paths"].items() for method, operation in item.items()
            if "application/json" in operation.get("requestBody", {}).get("content", {})]


@pytest.mark.parametrize("model,num_classes", [("ssd-small", 4), ("ssd-small", 2)])
def test_every_json_body_has_an_example_that_succeeds(tmp_path, model, num_classes):
    settings = make_settings(tmp_path, model=model, num_classes=num_classes, class_names=[],
                             max_image_pixels=4096 * 4096)
    with start_client(settings) as client:
        bodies = json_bodies(client.get("/openapi.json").json())
        assert {content["schema"]["$ref"].rsplit("/", 1)[1] for _, _, content in bodies} == set(BODY_EXAMPLES)
        for method, path, content in bodies:
            assert content["examples"], path
            for name, example in content["examples"].items():
                response = client.request(method.upper(), path, json=example["value"],
                                          params={"wait": "true"} if path == "/finetune" else None)
                assert response.status_code == 200, (path, name, response.text)


def test_the_example_image_holds_one_rectangle_and_is_tiny():
    image, boxes, labels = example_image()
    assert len(image) < 12_000  # base64 characters
    assert decode_image_bytes(base64.b64decode(image), 64 * 64).shape == (3, 64, 64)
    assert labels == [0] and len(boxes) == 1  # label 0 exists in every model


def test_detect_documents_the_drawn_answer_too(client):
    content = client.get("/openapi.json").json()["paths"]["/detect"]["post"]["requestBody"]["content"]
    examples = content["application/json"]["examples"]
    assert examples["render"]["value"]["render"] is True
    drawn = client.post("/detect", json=examples["render"]["value"])
    assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/png"
