"""POST /detect: JSON and multipart, pixel boxes, thresholds, and bad input."""

from __future__ import annotations

import asyncio
import base64

import torch
from safetensors.torch import load_file
from torchvision.utils import draw_bounding_boxes

from ssd_core.data.images import decode_image_bytes, encode_jpeg, encode_png, to_model_input
from ssd_core.evaluation.drawing import class_colour
from ssd_core.models import build_model
from ssd_core.models.postprocess import detect
from tests.app.conftest import assert_error, png_bytes


def encoded(data: bytes) -> dict:
    return {"image": base64.b64encode(data).decode()}


def test_detect_json_returns_pixel_boxes(client, shapes):
    images = [png_bytes(shapes, 0), encode_jpeg(torch.zeros(3, 50, 120, dtype=torch.uint8) + 90)]
    response = client.post("/detect", json={"images": [encoded(d) for d in images], "score_threshold": 0.0,
                                            "max_detections": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == 0
    assert len(body["detections"]) == 2
    for found, (height, width) in zip(body["detections"], [(64, 64), (50, 120)], strict=True):
        assert 0 < len(found) <= 7
        scores = [d["score"] for d in found]
        assert scores == sorted(scores, reverse=True)
        for d in found:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            assert d["class_name"] == ["rectangle", "ellipse", "triangle"][d["label"]]
    assert client.sample("ssd_images_processed_total", route="/detect") == 2


def test_detect_matches_the_library_on_the_served_weights(client, shapes):
    """The route is decode -> resize/normalise -> model -> detect; redo it by hand with the checkpointed weights."""
    saved = client.app.state.store.versions()[0]
    model = build_model("ssd-small", 4)
    model.load_state_dict(load_file(saved.weights))
    model.eval()
    data = png_bytes(shapes, 1)
    image = decode_image_bytes(data, 10**6)
    spec = model.spec
    with torch.inference_mode():
        loc, conf, priors = model(to_model_input(image, spec.image_size, spec.pixel_mean, spec.pixel_std)[None])
        expected = detect(loc, conf, priors, score_threshold=0.05, max_detections=5, image_sizes=[(64, 64)])[0]
    body = client.post("/detect", json={"images": [encoded(data)], "score_threshold": 0.05, "max_detections": 5}).json()
    found = body["detections"][0]
    assert [d["label"] for d in found] == expected.labels.tolist()
    assert torch.allclose(torch.tensor([d["box"] for d in found]).reshape(-1, 4), expected.boxes, atol=1e-3)
    assert torch.allclose(torch.tensor([d["score"] for d in found]), expected.scores, atol=1e-5)


def test_score_threshold_filters(client, shapes):
    body = {"images": [encoded(png_bytes(shapes, 0))]}
    loose = client.post("/detect", json={**body, "score_threshold": 0.0}).json()["detections"][0]
    cutoff = sorted(d["score"] for d in loose)[len(loose) // 2]
    strict = client.post("/detect", json={**body, "score_threshold": cutoff}).json()["detections"][0]
    assert all(d["score"] > cutoff for d in strict)
    assert len(strict) < len(loose)


def test_detect_multipart(client, shapes):
    files = [("images", ("a.png", png_bytes(shapes, 0), "image/png")),
             ("images", ("b.png", png_bytes(shapes, 2), "image/png"))]
    response = client.post("/detect", files=files, data={"score_threshold": "0.0", "max_detections": "3"})
    assert response.status_code == 200, response.text
    assert [len(found) for found in response.json()["detections"]] == [3, 3]


def test_detect_errors(client, shapes):
    good = encoded(png_bytes(shapes, 0))
    big = encoded(encode_png(torch.zeros(3, 300, 300, dtype=torch.uint8)))  # 90000 pixels > 40000
    cases = [
        ({"images": []}, 422, "images"),
        ({"images": [good] * 5}, 422, "images"),
        ({"images": [good, encoded(b"GIF89a....")]}, 422, "images[1].image"),
        ({"images": [encoded(png_bytes(shapes, 0)[:60])]}, 422, "images[0].image"),  # truncated
        ({"images": [big]}, 422, "images[0].image"),
        ({"images": [good], "score_threshold": 1.0}, 422, "score_threshold"),
        ({"images": [good], "max_detections": 0}, 422, "max_detections"),
        ({"images": [{"image": "!!"}]}, 422, "images[0].image"),
        ({"pictures": [good]}, 422, "images"),
    ]
    for body, status, field in cases:
        assert_error(client.post("/detect", json=body), status, field)
    assert_error(client.post("/detect", files=[("images", ("x", b"nope", "image/png"))]), 422, "images[0]")
    misnamed = assert_error(client.post("/detect", files=[("file", ("x.png", b"nope", "image/png"))],
                                        data={"score_threshold": "0.1"}), 422, "images")
    assert "the fields that arrived: score_threshold (text), file (file)" in misnamed["message"]
    typo = assert_error(client.post("/detect", files=[("images", ("x.png", png_bytes(shapes, 0), "image/png"))],
                                    data={"score_treshold": "0.1"}), 422, "score_treshold")
    assert "unknown multipart field" in typo["message"] and "score_threshold" in typo["message"]
    assert client.get("/readyz").status_code == 200
    assert client.sample("ssd_images_processed_total", route="/detect") == 0


def test_a_data_url_prefix_is_accepted(client, shapes):
    """What a browser's canvas.toDataURL() or FileReader.readAsDataURL() gives: the prefix is stripped."""
    plain = encoded(png_bytes(shapes, 0))
    body = {"images": [plain], "score_threshold": 0.0}
    url = {"images": [{"image": "data:image/png;base64," + plain["image"]}], "score_threshold": 0.0}
    expected = client.post("/detect", json=body)
    answered = client.post("/detect", json=url)
    assert answered.status_code == 200, answered.text
    assert answered.json() == expected.json()
    jpeg = "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(torch.zeros(3, 40, 40, dtype=torch.uint8))).decode()
    assert client.post("/detect", json={"images": [{"image": jpeg}]}).status_code == 200


def test_render_answers_the_image_with_its_detections_drawn(client, shapes):
    """The PNG equals torchvision's drawing of the JSON answer's boxes and captions, in their classes' colours,
    on the decoded image."""
    data = png_bytes(shapes, 0)
    body = {"images": [encoded(data)], "score_threshold": 0.0, "max_detections": 5}
    found = client.post("/detect", json=body).json()["detections"][0]
    assert len(found) == 5
    rendered = client.post("/detect", json={**body, "render": True})
    assert rendered.status_code == 200, rendered.text
    assert rendered.headers["content-type"] == "image/png" and rendered.headers["x-model-version"] == "0"
    image = decode_image_bytes(data, 64 * 64)
    colours = [class_colour(d["label"]) for d in found]  # one colour per class
    expected = draw_bounding_boxes(image, torch.tensor([d["box"] for d in found]), colors=colours, width=2,
                                   labels=[f"{d['class_name']} {d['score']:.2f}" for d in found])
    drawn = decode_image_bytes(rendered.content, 64 * 64)
    assert torch.equal(drawn, expected)
    assert not torch.equal(drawn, image)
    files = [("images", ("a.png", data, "image/png"))]
    multipart = client.post("/detect", files=files, data={"render": "true", "score_threshold": "0.0",
                                                           "max_detections": "5"})
    assert multipart.status_code == 200 and multipart.content == rendered.content
    nothing = client.post("/detect", json={**body, "score_threshold": 0.999, "render": True})
    assert torch.equal(decode_image_bytes(nothing.content, 64 * 64), image)  # no detection: the image itself


def test_render_takes_one_image(client, shapes):
    two = [encoded(png_bytes(shapes, 0)), encoded(png_bytes(shapes, 1))]
    error = assert_error(client.post("/detect", json={"images": two, "render": True}), 422, "images")
    assert "one image per request, got 2" in error["message"]
    assert client.sample("ssd_images_processed_total", route="/detect") == 0


def test_images_are_queued_from_the_worker_thread_that_prepared_them(client, shapes, monkeypatch):
    """The forward pass can start without the event loop: the hop that decodes and prepares a request's images
    also queues them (no running event loop in the thread that queues)."""
    inference = client.app.state.inference
    submit, queued_on_loop = inference.submit, []

    def recording_submit(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            queued_on_loop.append(True)
        except RuntimeError:
            queued_on_loop.append(False)
        return submit(*args, **kwargs)

    monkeypatch.setattr(inference, "submit", recording_submit)
    assert client.post("/detect", json={"images": [encoded(png_bytes(shapes, 0))]}).status_code == 200
    assert client.post("/detect", files=[("images", ("a.png", png_bytes(shapes, 1), "image/png"))]).status_code == 200
    assert queued_on_loop == [False, False]
