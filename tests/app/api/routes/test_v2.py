"""The Open Inference Protocol routes in process: metadata, versions, the same answers as /detect and
/score-loss, the binary extension, and errors in the protocol's `{"error": "..."}` shape."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from ssd_core.data.images import encode_jpeg, encode_png
from tests.app.api.routes.test_score_loss import as_safetensors, post_binary, random_batch
from tests.app.conftest import png_bytes


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


def uint8_input(images: list[torch.Tensor]) -> dict:
    array = torch.stack(images).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
    return {"name": "images", "datatype": "UINT8", "shape": list(array.shape), "data": array.reshape(-1).tolist()}


def outputs_of(response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}


def test_server_and_model_metadata_name_the_served_version(client):
    assert client.get("/v2").json() == {"name": "ssd-service", "version": client.app.version,
                                        "extensions": ["binary_tensor_data"]}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2/models/ssd").json()
    assert meta["versions"] == ["0"]
    assert [t["name"] for t in meta["outputs"]] == ["boxes", "scores", "labels", "num_detections"]
    loss = client.get("/v2/models/ssd-loss/versions/0").json()
    assert {"name": "conf", "datatype": "FP32", "shape": [-1, -1, 4]} in loss["inputs"]
    assert client.get("/v2/models/ssd/versions/0/ready").json() == {"name": "ssd", "ready": True}
    assert "serves version 0, not '1'" in error_of(client.get("/v2/models/ssd/versions/1"), 404)
    assert "not served here" in error_of(client.get("/v2/models/yolo/ready"), 404)
    assert error_of(client.post("/v2/models/ssd/versions/7/infer", json={"inputs": []}), 404)


def test_ssd_json_infer_gives_the_detections_of_detect(client, shapes):
    wide = torch.zeros(3, 50, 120, dtype=torch.uint8) + 90
    wide[:, 10:30, 20:70] = 200
    square = shapes[0].image  # [3, 64, 64]
    options = {"score_threshold": 0.05, "max_detections": 6}
    outputs = {}
    for image in (square, wide):  # UINT8 needs one size per request
        request = {"inputs": [uint8_input([image])], "parameters": options}
        outputs[image.shape[2]] = outputs_of(client.post("/v2/models/ssd/infer", json=request))
    encoded = [png_bytes(shapes, 0), encode_png(wide)]
    detect = client.post("/detect", json={"images": [{"image": base64.b64encode(d).decode()} for d in encoded],
                                          **options}).json()
    for found, width in zip(detect["detections"], (64, 120), strict=True):
        out = outputs[width]
        count = int(out["num_detections"][0])
        assert count == len(found) > 0
        np.testing.assert_allclose(out["boxes"][0, :count], [d["box"] for d in found], atol=1e-4)
        np.testing.assert_allclose(out["scores"][0, :count], [d["score"] for d in found], atol=1e-6)
        assert out["labels"][0, :count].tolist() == [d["label"] for d in found]
        assert (out["labels"][0, count:] == -1).all() and (out["scores"][0, count:] == 0).all()


def test_ssd_bytes_input_takes_png_and_jpeg_as_base64_in_json(client, shapes):
    files = [png_bytes(shapes, 1), encode_jpeg(shapes[2].image)]
    request = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2],
                           "data": [base64.b64encode(f).decode() for f in files]}],
               "parameters": {"score_threshold": 0.05}}
    out = outputs_of(client.post("/v2/models/ssd/infer", json=request))
    detect = client.post("/detect", json={"images": [{"image": base64.b64encode(f).decode()} for f in files],
                                          "score_threshold": 0.05}).json()["detections"]
    assert out["num_detections"].tolist() == [len(d) for d in detect]
    assert out["boxes"].shape[:2] == (2, max(len(d) for d in detect))
    assert client.sample("ssd_images_processed_total", route="/v2/models/ssd/infer") == 2
    assert client.sample("ssd_inference_batch_size_count", route="/v2/models/ssd/infer") == 1


def test_binary_outputs_follow_the_json_header_when_asked(client, shapes):
    request = {"inputs": [uint8_input([shapes[0].image, shapes[1].image])],
               "outputs": [{"name": "num_detections"}, {"name": "boxes", "parameters": {"binary_data": True}}],
               "parameters": {"score_threshold": 0.05}}
    response = client.post("/v2/models/ssd/infer", json=request)
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    header = json.loads(response.content[:length])
    counts, boxes = header["outputs"]
    assert counts["name"] == "num_detections" and len(counts["data"]) == 2
    assert boxes["parameters"]["binary_data_size"] == len(response.content) - length
    raw = np.frombuffer(response.content[length:], np.float32).reshape(boxes["shape"])
    assert raw.shape[0] == 2 and np.isfinite(raw).all()


def test_ssd_loss_gives_the_numbers_of_score_loss(client):
    loc, conf, targets = random_batch(2, seed=4)
    padded = torch.full((2, 2, 6), -1.0)
    for b, t in enumerate(targets):
        padded[b, : len(t)] = t
    expected = post_binary(client, as_safetensors(loc, conf, targets, metadata={"neg_pos": "2"})).json()
    inputs = [{"name": name, "datatype": "FP32", "shape": list(t.shape), "data": t.reshape(-1).tolist()}
              for name, t in (("loc", loc), ("conf", conf), ("targets", padded[..., :5]))]
    out = outputs_of(client.post("/v2/models/ssd-loss/infer", json={"inputs": inputs, "parameters": {"neg_pos": 2}}))
    assert out["loss_l"][0] == pytest.approx(expected["loss_l"], rel=1e-6)
    assert out["loss_c"][0] == pytest.approx(expected["loss_c"], rel=1e-6)
    assert out["loss"][0] == pytest.approx(expected["loss"], rel=1e-6)
    for name in ("num_ground_truth", "num_positives", "num_negatives", "num_forced_matches"):
        assert out[name].tolist() == [image[name] for image in expected["per_image"]]
    np.testing.assert_allclose(out["image_loss_l"], [i["loss_l"] for i in expected["per_image"]], rtol=1e-6)
    np.testing.assert_allclose(out["mean_matched_iou"], [i["mean_matched_iou"] for i in expected["per_image"]],
                               rtol=1e-6)
    assert client.sample("ssd_loss_loc_count", source="score") == 2  # both requests recorded their match stats


@pytest.mark.parametrize(("model", "request_body", "status", "message"), [
    ("ssd", {"inputs": []}, 400, "input 'images' is missing"),
    ("ssd", {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 2, 2, 3], "data": [0.0] * 12}]}, 400,
     "must be UINT8 [B, H, W, 3] or BYTES [B]"),
    ("ssd", {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0] * 12}],
             "parameters": {"score_threshold": 2}}, 400, "parameters.score_threshold"),
    ("ssd", {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0] * 12}],
             "parameters": {"nms": 1}}, 400, "parameters.nms"),
    ("ssd", {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 300, 300, 3], "data": [0] * 270000}]},
     400, "300x300 pixels, the limit is 1..40000 (SSD_MAX_IMAGE_PIXELS)"),
    ("ssd", {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [5, 1, 1, 3], "data": [0] * 15}]}, 422,
     "5 images exceed the limit of 4 (SSD_MAX_IMAGES_PER_REQUEST)"),
    ("ssd", {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["not an image"]}]}, 400,
     "images[0]: neither PNG/JPEG bytes nor their base64"),
    ("ssd", {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                         "data": [base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode()]}]}, 422, "images[0]"),
    ("ssd", {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [0] * 3}],
             "outputs": [{"name": "masks"}]}, 400, "output 'masks' is not one of"),
    ("ssd-loss", {"inputs": [{"name": "loc", "datatype": "FP32", "shape": [1], "data": [0.0]}]}, 400,
     "input 'conf' is missing; inputs: conf, loc, priors, targets; sent: loc"),
    ("ssd", {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [0] * 3}]}, 400,
     "input 'images' is missing; inputs: images; sent: image"),
    ("ssd", {"inputs": [{"name": n, "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [0] * 3}
                        for n in ("images", "masks")]}, 400, "input 'masks' is unknown; inputs: images; sent: images, masks"),
    ("ssd-loss", {"inputs": [{"name": n, "datatype": "FP64", "shape": [1], "data": [0.0]}
                             for n in ("loc", "conf", "targets")]}, 400, "must be FP32"),
    ("ssd-loss", {"inputs": [{"name": n, "datatype": "FP32", "shape": [1, 1, 5], "data": [0.0] * 5}
                             for n in ("loc", "conf", "targets")]}, 422, "loc: must be [B][P][4]"),
    ("ssd", b"{", 400, "not valid JSON"),
])
def test_bad_requests_answer_the_protocol_error_shape(client, model, request_body, status, message, unchanged):
    kwargs = {"content": request_body} if isinstance(request_body, bytes) else {"json": request_body}
    assert message in error_of(client.post(f"/v2/models/{model}/infer", **kwargs), status)
