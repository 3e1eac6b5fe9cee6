"""Triton's own HTTP client (`tritonclient[http]` from PyPI) against the live service: liveness,
readiness, metadata, and JSON and binary inference of both models, equal to /detect and /score-loss."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from ssd_core.data.images import encode_png
from ssd_core.data.synthetic import ShapesDataset
from tests.integration.live import LiveService

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("integration-v2")]

OPTIONS = {"score_threshold": 0.05, "max_detections": 8}
DETECTOR_OUTPUTS = ("boxes", "scores", "labels", "num_detections")


@pytest.fixture(scope="module")
def client(live_service: LiveService):
    with triton.InferenceServerClient(live_service.host_port, network_timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    dataset = ShapesDataset(2, image_size=96, seed=21)
    return [dataset[k].image for k in range(2)]  # [3, 96, 96] uint8 each


@pytest.fixture(scope="module")
def detected(live_service: LiveService, images) -> list[list[dict]]:
    """What /detect answers for the images."""
    body = {"images": [{"image": base64.b64encode(encode_png(im)).decode()} for im in images], **OPTIONS}
    response = httpx.post(f"{live_service.url}/detect", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["detections"]


def test_health_and_metadata(client, live_service):
    assert client.is_server_live() and client.is_server_ready()
    version = str(httpx.get(f"{live_service.url}/model").json()["version"])
    assert client.is_model_ready("ssd") and client.is_model_ready("ssd-loss", version)
    assert not client.is_model_ready("ssd", str(int(version) + 1))
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("ssd")
    assert meta["versions"] == [version]
    assert [o["name"] for o in meta["outputs"]] == list(DETECTOR_OUTPUTS)
    with pytest.raises(InferenceServerException, match="not served here"):
        client.get_model_metadata("resnet")


def assert_same_as_detect(result, found: list[list[dict]]) -> None:
    counts = result.as_numpy("num_detections")
    assert counts.tolist() == [len(f) for f in found] and counts.sum() > 0
    for b, per_image in enumerate(found):
        k = len(per_image)
        np.testing.assert_allclose(result.as_numpy("boxes")[b, :k], [d["box"] for d in per_image], atol=1e-4)
        np.testing.assert_allclose(result.as_numpy("scores")[b, :k], [d["score"] for d in per_image], atol=1e-6)
        assert result.as_numpy("labels")[b, :k].tolist() == [d["label"] for d in per_image]
        assert (result.as_numpy("labels")[b, k:] == -1).all()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_ssd_uint8_infer_equals_detect(client, images, detected, binary):
    pixels = torch.stack(images).permute(0, 2, 3, 1).contiguous().numpy()  # [B, H, W, 3] RGB
    tensor = triton.InferInput("images", list(pixels.shape), "UINT8").set_data_from_numpy(pixels, binary_data=binary)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in DETECTOR_OUTPUTS]
    result = client.infer("ssd", [tensor], outputs=outputs, parameters=OPTIONS)
    assert result.get_response()["model_name"] == "ssd"
    assert_same_as_detect(result, detected)


def test_ssd_encoded_png_bytes_infer_equals_detect(client, images, detected):
    files = np.array([encode_png(im) for im in images], dtype=object)
    tensor = triton.InferInput("images", [len(files)], "BYTES").set_data_from_numpy(files, binary_data=True)
    result = client.infer("ssd", [tensor], parameters=OPTIONS)  # no outputs named: all of them, binary
    assert_same_as_detect(result, detected)


def loss_inputs(seed: int = 5) -> dict[str, np.ndarray]:
    """ssd-small predictions and targets (the small model has 4 classes and its own priors)."""
    from ssd_core.models import build_model

    priors = build_model("ssd-small", 4).priors
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(2, priors.shape[0], 4, generator=g)
    conf = torch.randn(2, priors.shape[0], 4, generator=g)
    targets = torch.tensor([[[0.1, 0.1, 0.5, 0.6, 0], [0.4, 0.3, 0.9, 0.8, 2]],
                            [[0.2, 0.2, 0.7, 0.5, 1], [-1, -1, -1, -1, -1]]])  # label < 0 pads
    return {"loc": loc.numpy(), "conf": conf.numpy(), "targets": targets.numpy()}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_ssd_loss_infer_equals_score_loss(client, live_service, binary):
    tensors = loss_inputs()
    body = safetensors.torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, metadata={"neg_pos": "2"})
    expected = httpx.post(f"{live_service.url}/score-loss", content=body, timeout=120,
                          headers={"Content-Type": "application/octet-stream"}).json()
    inputs = [triton.InferInput(name, list(array.shape), "FP32").set_data_from_numpy(array, binary_data=binary)
              for name, array in tensors.items()]
    names = ["loss_l", "loss_c", "num_positives", "num_negatives", "num_ground_truth", "mean_matched_iou"]
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in names]
    result = client.infer("ssd-loss", inputs, outputs=outputs, parameters={"neg_pos": 2})
    assert result.as_numpy("loss_l")[0] == pytest.approx(expected["loss_l"], rel=1e-6)
    assert result.as_numpy("loss_c")[0] == pytest.approx(expected["loss_c"], rel=1e-6)
    for name in ("num_positives", "num_negatives", "num_ground_truth"):
        assert result.as_numpy(name).tolist() == [image[name] for image in expected["per_image"]]
    np.testing.assert_allclose(result.as_numpy("mean_matched_iou"),
                               [image["mean_matched_iou"] for image in expected["per_image"]], rtol=1e-6)


def test_protocol_errors_reach_the_client(client):
    pixels = np.zeros((1, 8, 8, 3), np.float32)
    tensor = triton.InferInput("images", [1, 8, 8, 3], "FP32").set_data_from_numpy(pixels)
    with pytest.raises(InferenceServerException, match="must be UINT8") as error:
        client.infer("ssd", [tensor])
    assert error.value.status() == "400"
    with pytest.raises(InferenceServerException, match="serves version"):
        client.infer("ssd", [tensor], model_version="999")
