"""The /labelstudio routes (app.api.routes.label_studio) in process, Label Studio replaced by an httpx
MockTransport serving projects, tasks, annotations and images: auth, /setup's label check, /predict against
/detect, and webhooks that train only on what Label Studio returns."""

from __future__ import annotations

import base64
import time

import httpx
import pytest

from app.labelstudio.client import LabelStudioClient
from ssd_core.data.images import encode_png
from tests.app.conftest import OVERFIT, TOKEN, assert_error, make_settings, start_client

CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
          '<Label value="rectangle"/><Label value="ellipse"/><Label value="triangle"/></RectangleLabels></View>')
NAMES = ("rectangle", "ellipse", "triangle")
BASIC = httpx.BasicAuth("label-studio", TOKEN)


def rectangles(sample, rotation: float = 0) -> list[dict]:
    height, width = sample.image.shape[1:]
    return [{"from_name": "label", "to_name": "image", "type": "rectanglelabels",
             "value": {"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
                       "height": 100 * (y2 - y1) / height, "rotation": rotation, "rectanglelabels": [NAMES[label]]}}
            for (x1, y1, x2, y2), label in zip(sample.boxes.tolist(), sample.labels.tolist(), strict=True)]


class FakeLabelStudio:
    """Project 1 with a task per OVERFIT image (`/data/upload/1/<k>.png`); annotations added by the tests."""

    def __init__(self) -> None:
        self.tasks = {10 + k: {"id": 10 + k, "project": 1, "data": {"image": f"/data/upload/1/{k}.png"}}
                      for k in range(len(OVERFIT))}
        self.annotations: dict[int, dict] = {}

    def annotate(self, annotation_id: int, task_id: int, result: list[dict], cancelled: bool = False) -> None:
        self.annotations[annotation_id] = {"id": annotation_id, "task": task_id, "project": 1, "result": result,
                                           "was_cancelled": cancelled, "updated_at": f"2026-01-01T00:00:{annotation_id:02d}"}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Token ls-key"
        parts = request.url.path.strip("/").split("/")
        if parts[:2] == ["data", "upload"]:
            k = int(parts[3].split(".")[0])
            return httpx.Response(200, content=encode_png(OVERFIT[k].image)) if k < len(OVERFIT) else httpx.Response(404)
        if parts == ["api", "projects", "1"]:
            return httpx.Response(200, json={"id": 1, "label_config": CONFIG})
        if parts[:2] == ["api", "tasks"] and len(parts) == 3 and int(parts[2]) in self.tasks:
            return httpx.Response(200, json=self.tasks[int(parts[2])])
        if parts == ["api", "tasks"]:
            page = [{**task, "annotations": [a for a in self.annotations.values() if a["task"] == task["id"]]}
                    for task in self.tasks.values()]
            return httpx.Response(200, json={"tasks": page if request.url.params["page"] == "1" else []})
        if parts[:2] == ["api", "annotations"] and int(parts[2]) in self.annotations:
            return httpx.Response(200, json=self.annotations[int(parts[2])])
        return httpx.Response(404, json={"detail": "Not found."})


@pytest.fixture
def fake() -> FakeLabelStudio:
    return FakeLabelStudio()


@pytest.fixture
def ls_client(tmp_path, trained_weights, fake):
    settings = make_settings(tmp_path, weights=trained_weights, api_token=TOKEN, label_studio_url="http://ls.test",
                             label_studio_api_key="ls-key", stream_batch_images=2, stream_steps=1, max_batch_images=2,
                             publish="gated", score_threshold=0.3)
    with start_client(settings) as client:
        backend = client.app.state.label_studio
        backend.client = backend.intake.client = LabelStudioClient("http://ls.test", "ls-key",
                                                                   transport=httpx.MockTransport(fake))
        yield client


def label_studio_jobs(client) -> list[dict]:
    return client.get("/finetune", params={"source": "label-studio"}).json()["jobs"]


def wait_for(check, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_basic_auth_with_the_token(ls_client):
    for path in ("/labelstudio/health", "/labelstudio/versions"):
        assert_error(ls_client.get(path), 401, "Authorization", "unauthorized")
        assert_error(ls_client.get(path, auth=httpx.BasicAuth("x", "wrong")), 401, "Authorization")
        assert ls_client.get(path, auth=BASIC).status_code == 200
        assert ls_client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert_error(ls_client.post("/labelstudio/predict", json={"tasks": [], "label_config": CONFIG}), 401,
                 "Authorization")
    # the webhook takes no credentials (Label Studio sends none): it only names what to fetch
    assert ls_client.post("/labelstudio/webhook", json={"action": "PROJECT_UPDATED"}).json() == {"status": "ignored"}


def test_setup_checks_the_labels(ls_client):
    answer = ls_client.post("/labelstudio/setup", json={"project": "1.17", "schema": CONFIG, "hostname": "x"},
                            auth=BASIC)
    assert answer.json() == {"model_version": f"ssd-small-v{ls_client.version}"}
    error = assert_error(ls_client.post("/labelstudio/setup", auth=BASIC, json={
        "schema": CONFIG.replace('"ellipse"', '"Oval"').replace('"triangle"', '"Car"')}), 422, "schema")
    assert "['Oval', 'Car']" in error["message"]
    assert_error(ls_client.post("/labelstudio/setup", auth=BASIC, json={"project": 1}), 422, "schema")
    assert ls_client.get("/labelstudio/versions", auth=BASIC).json()["versions"][0] == f"ssd-small-v{ls_client.version}"


def test_unconfigured(tmp_path):
    with start_client(make_settings(tmp_path)) as client:
        assert_error(client.post("/labelstudio/setup", json={"schema": CONFIG}), 409, None,
                     "label_studio_not_configured")
        assert_error(client.post("/labelstudio/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}),
                     409, None, "label_studio_not_configured")


def test_predict_equals_detect(ls_client):
    data_url = "data:image/png;base64," + base64.b64encode(encode_png(OVERFIT[0].image)).decode()
    tasks = [{"id": 1, "data": {"image": data_url}}, {"id": 2, "data": {"image": "/data/upload/1/1.png"}},
             {"id": 3, "data": {"image": "http://elsewhere.test/1.png"}}, {"id": 4, "data": {"image": "/data/upload/1/9.png"}},
             {"id": 5, "data": {"other": "x"}}, {"id": 6, "data": {"image": "http://ls.test/data/upload/1/2.png"}}]
    answer = ls_client.post("/labelstudio/predict", auth=BASIC, json={"tasks": tasks, "label_config": CONFIG,
                                                                      "project": "1.17", "params": {}})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == len(tasks)
    for k, result in ((0, results[0]), (1, results[1]), (2, results[5])):  # 3 images: 2 forward passes of 2 + 1
        image = OVERFIT[k].image
        detect = ls_client.post("/detect", json={"images": [{"image": base64.b64encode(encode_png(image)).decode()}]})
        expected = detect.json()["detections"][0]
        assert expected and result["model_version"] == f"ssd-small-v{detect.json()['model_version']}"
        height, width = image.shape[1:]
        for item, found in zip(result["result"], expected, strict=True):
            value = item["value"]
            assert [value["x"] * width / 100, value["y"] * height / 100, (value["x"] + value["width"]) * width / 100,
                    (value["y"] + value["height"]) * height / 100] == pytest.approx(found["box"], abs=1e-4)
            assert value["rectanglelabels"] == [found["class_name"]] and item["score"] == pytest.approx(found["score"])
        assert result["score"] == pytest.approx(sum(f["score"] for f in expected) / len(expected))
    for k in (2, 3, 4):  # not on Label Studio, missing, no image URL: an empty result, not a failed batch
        assert results[k]["result"] == [] and results[k]["score"] == 0.0
    assert ls_client.sample("ssd_label_studio_predicted_tasks_total", outcome="image_failed") == 3
    assert_error(ls_client.post("/labelstudio/predict", auth=BASIC, json={"tasks": tasks}), 422, "label_config")


def test_webhooks_train_on_what_label_studio_returns(ls_client, fake):
    fake.annotate(1, 10, rectangles(OVERFIT[0]))
    fake.annotate(2, 11, rectangles(OVERFIT[1]))
    forged_result = [{**box, "value": {**box["value"], "rectanglelabels": ["triangle"]}}
                     for box in rectangles(OVERFIT[0])]
    for annotation_id, task_id in ((1, 10), (2, 11)):
        payload = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": task_id},
                   "annotation": {"id": annotation_id, "task": task_id, "result": forged_result}}
        assert ls_client.post("/labelstudio/webhook", json=payload).json() == {"status": "queued"}
    job = wait_for(lambda: [j for j in label_studio_jobs(ls_client) if j["status"] not in ("queued", "running")])[0]
    assert job["status"] == "succeeded", job
    assert [(o["task_id"], o["annotation_id"], o["project_id"]) for o in job["label_studio"]] == [(10, 1, 1), (11, 2, 1)]
    boxes = {row["class_name"]: row["num_ground_truth"] for row in job["per_class"]}
    truth = {name: sum((OVERFIT[k].labels == label).sum().item() for k in (0, 1)) for label, name in enumerate(NAMES)}
    assert boxes == truth  # Label Studio's boxes, not the payload's (all triangles)
    # an annotation Label Studio does not have trains nothing, whatever the webhook says
    before = ls_client.sample("ssd_label_studio_annotations_total", outcome="not_found")
    for annotation_id in (77, 78, 79):
        ls_client.post("/labelstudio/webhook", json={"action": "ANNOTATION_UPDATED", "annotation": {
            "id": annotation_id, "task": 12, "result": rectangles(OVERFIT[2])}})
    wait_for(lambda: ls_client.sample("ssd_label_studio_annotations_total", outcome="not_found") == before + 3)
    assert len(label_studio_jobs(ls_client)) == 1 and ls_client.app.state.label_studio.stream.pending == 0


def test_skipped_deleted_and_start_training(ls_client, fake):
    stream = ls_client.app.state.label_studio.stream
    fake.annotate(1, 10, rectangles(OVERFIT[0]))
    ls_client.post("/labelstudio/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"id": 1}})
    wait_for(lambda: stream.pending == 1)
    ls_client.post("/labelstudio/webhook", json={"action": "ANNOTATION_DELETED", "annotation": {"id": 1}})
    time.sleep(0.5)  # Label Studio still has it: a forged deletion changes nothing
    assert stream.pending == 1
    del fake.annotations[1]
    ls_client.post("/labelstudio/webhook", json={"action": "ANNOTATION_DELETED", "annotation": {"id": 1}})
    wait_for(lambda: stream.pending == 0)
    fake.annotate(3, 12, rectangles(OVERFIT[2], rotation=45))  # only rotated boxes: nothing to train on
    fake.annotate(4, 13, rectangles(OVERFIT[3]), cancelled=True)
    ls_client.post("/labelstudio/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"id": 3}})
    ls_client.post("/labelstudio/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"id": 4}})
    wait_for(lambda: ls_client.sample("ssd_label_studio_annotations_total", outcome="cancelled") == 1)
    assert ls_client.sample("ssd_label_studio_annotations_total", outcome="no_boxes") == 1
    assert ls_client.sample("ssd_label_studio_skipped_boxes_total", reason="rotated") == len(OVERFIT[2].boxes)
    assert stream.pending == 0
    # Start Training pulls every annotated task: two usable ones (the newest annotation of task 10) make a job
    fake.annotate(5, 10, rectangles(OVERFIT[1]))
    fake.annotate(6, 10, rectangles(OVERFIT[0]))
    fake.annotate(7, 11, rectangles(OVERFIT[1]))
    ls_client.post("/labelstudio/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    job = wait_for(lambda: [j for j in label_studio_jobs(ls_client) if j["status"] not in ("queued", "running")])[0]
    assert {(o["task_id"], o["annotation_id"]) for o in job["label_studio"]} == {(10, 6), (11, 7)}
    before = ls_client.sample("ssd_label_studio_annotations_total", outcome="not_found")
    ls_client.post("/labelstudio/webhook", json={"action": "START_TRAINING", "project": {"id": 2}})
    wait_for(lambda: ls_client.sample("ssd_label_studio_annotations_total", outcome="not_found") == before + 1)
    assert len(label_studio_jobs(ls_client)) == 1


def test_webhook_needs_ids(ls_client):
    assert_error(ls_client.post("/labelstudio/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {}}),
                 422, "annotation.id")
    assert_error(ls_client.post("/labelstudio/webhook", json={"project": {"id": 1}}), 422, "action")
