"""The service as Label Studio's ML backend, against a real, unmodified Label Studio (its own venv from PyPI,
installed by deploy/scripts/install-label-studio.sh; skipped, saying why, when it cannot be installed).

Label Studio connects to `/labelstudio` with and without SSD_API_TOKEN (HTTP Basic), retrieves predictions
that equal `/detect`'s, its annotators' saved annotations reach the service by webhook and train a
`source: label-studio` job that publishes, the labelling stream keeps pre-filling predictions of the newest
version, "Start Training" trains on the project's annotations, and a forged webhook trains nothing.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import httpx
import pytest

from ssd_core.data.images import encode_png
from ssd_core.data.synthetic import ShapesDataset
from tests.integration.label_studio_live import (
    LABEL_CONFIG,
    LEGACY_TOKEN,
    LiveLabelStudio,
    install,
    run_label_studio,
)
from tests.integration.live import LiveService, run_service

# one worker runs both tests on one Label Studio (the module fixture): a second instance would cost 400 MB
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.xdist_group("label_studio")]

TOKEN = "ssd-integration-token"
STREAM_IMAGES = 4
SERVICE_ENV = {  # random weights: a low threshold gives every image a few boxes to compare with /detect
    "SSD_CLASS_NAMES": "shapes", "SSD_SCORE_THRESHOLD": "0.2", "SSD_MAX_DETECTIONS": "5",
    "SSD_STREAM_BATCH_IMAGES": str(STREAM_IMAGES), "SSD_STREAM_STEPS": "2", "SSD_HOLDOUT_FRACTION": "0",
}
IMAGES = ShapesDataset(8, image_size=96, seed=21, min_objects=1, max_objects=2)


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory) -> Iterator[LiveLabelStudio]:
    reason = install()
    if reason is not None:
        pytest.skip(reason)
    with run_label_studio(tmp_path_factory.mktemp("label-studio")) as live:
        yield live


def personal_access_token(ls: LiveLabelStudio) -> str:
    """A personal access token (a JWT refresh token) of the test user."""
    with ls.api() as api:
        response = api.post("/api/token/")
        if response.status_code == 409:  # one per user: revoke the existing one first
            api.delete("/api/token/")  # pragma: no cover - a fresh data directory has none
            response = api.post("/api/token/")
        assert response.status_code in (200, 201), response.text
        return response.json()["token"]


def create_project(api: httpx.Client, title: str) -> tuple[int, list[dict]]:
    """A rectangle project with the 8 synthetic images uploaded as tasks; (project id, its tasks by image)."""
    project = api.post("/api/projects", json={"title": title, "label_config": LABEL_CONFIG})
    assert project.status_code == 201, project.text
    project_id = project.json()["id"]
    files = [(f"file{k}", (f"shape{k}.png", encode_png(IMAGES[k].image), "image/png")) for k in range(len(IMAGES))]
    imported = api.post(f"/api/projects/{project_id}/import", files=files)
    assert imported.status_code == 201, imported.text
    tasks = api.get("/api/tasks", params={"project": project_id, "page_size": 100}).json()["tasks"]
    by_name = {task["data"]["image"].rsplit("-", 1)[-1]: task for task in tasks}
    return project_id, [by_name[f"shape{k}.png"] for k in range(len(IMAGES))]


def connect(api: httpx.Client, project_id: int, service: LiveService, password: str | None) -> httpx.Response:
    """Add the service as the project's ML backend (Label Studio checks /health and /setup first)."""
    body = {"project": project_id, "url": f"{service.url}/labelstudio", "title": "ssd-service"}
    if password is not None:
        body |= {"auth_method": "BASIC_AUTH", "basic_auth_user": "label-studio", "basic_auth_pass": password}
    return api.post("/api/ml", json=body)


def rectangles(sample) -> list[dict]:
    """The sample's boxes as an annotator's Label Studio rectangle results."""
    height, width = sample.image.shape[1:]
    results = []
    for (x1, y1, x2, y2), label in zip(sample.boxes.tolist(), sample.labels.tolist(), strict=True):
        results.append({
            "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
                      "height": 100 * (y2 - y1) / height, "rotation": 0,
                      "rectanglelabels": [("rectangle", "ellipse", "triangle")[label]]},
        })
    return results


def annotate(api: httpx.Client, task: dict, sample) -> int:
    """Save an annotation as the labelling UI does (Label Studio then sends ANNOTATION_CREATED)."""
    response = api.post(f"/api/tasks/{task['id']}/annotations/", json={"result": rectangles(sample),
                                                                       "was_cancelled": False})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"{what} within {timeout_s:.0f} s")


def label_studio_jobs(service: LiveService, headers: dict) -> list[dict]:
    return httpx.get(f"{service.url}/finetune", params={"source": "label-studio", "limit": 100},
                     headers=headers, timeout=10).json()["jobs"]


def metric(service: LiveService, name: str, **labels: str) -> float:
    """One sample of the service's /metrics (0 when absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in httpx.get(f"{service.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def check_predictions_equal_detect(api: httpx.Client, service: LiveService, tasks: list[dict], headers: dict) -> str:
    """Each task's prediction held by Label Studio equals /detect's boxes on the task's image (percent ->
    pixels); returns their model_version."""
    versions = set()
    for k, task in enumerate(tasks):
        predictions = api.get("/api/predictions/", params={"task": task["id"]}).json()
        assert predictions, f"task {task['id']} has no prediction"
        prediction = max(predictions, key=lambda p: p["id"])
        versions.add(prediction["model_version"])
        image = base64.b64encode(encode_png(IMAGES[k].image)).decode()
        detect = httpx.post(f"{service.url}/detect", json={"images": [{"image": image}]}, headers=headers,
                            timeout=60).json()
        assert prediction["model_version"] == f"ssd-small-v{detect['model_version']}"
        expected = detect["detections"][0]
        assert len(prediction["result"]) == len(expected) > 0
        for result, found in zip(prediction["result"], expected, strict=True):
            value, (height, width) = result["value"], IMAGES[k].image.shape[1:]
            box = [value["x"] * width / 100, value["y"] * height / 100, (value["x"] + value["width"]) * width / 100,
                   (value["y"] + value["height"]) * height / 100]
            assert box == pytest.approx(found["box"], abs=1e-3)
            assert value["rectanglelabels"] == [found["class_name"]]
            assert result["score"] == pytest.approx(found["score"], abs=1e-6)
        scores = [found["score"] for found in expected]
        assert prediction["score"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
    assert len(versions) == 1
    return versions.pop()


def retrieve_predictions(api: httpx.Client, project_id: int) -> None:
    """The Data Manager's "Retrieve Predictions" action on every task."""
    response = api.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project_id},
                        json={"selectedItems": {"all": True, "excluded": []}})
    assert response.status_code == 200, response.text


def test_with_token_predict_stream_and_start_training(label_studio, tmp_path):
    pat = personal_access_token(label_studio)  # the service authenticates with a personal access token
    headers = {"Authorization": f"Bearer {TOKEN}"}
    env = {**SERVICE_ENV, "SSD_API_TOKEN": TOKEN, "SSD_LABEL_STUDIO_URL": label_studio.url,
           "SSD_LABEL_STUDIO_API_KEY": pat}
    with run_service(tmp_path, **env) as service, label_studio.api() as api:
        project_id, tasks = create_project(api, "with token")
        # without Label Studio's basic auth (or with another password) the backend refuses the connection
        for password in (None, "wrong"):
            refused = connect(api, project_id, service, password)
            assert refused.status_code == 400 and "authentication" in refused.text, refused.text
        answer = connect(api, project_id, service, password=TOKEN)
        assert answer.status_code == 201, answer.text
        backend = answer.json()
        assert backend["state"] == "CO", backend
        served = httpx.get(f"{service.url}/model", timeout=10).json()["version"]
        assert api.get(f"/api/ml/{backend['id']}/versions").json()["versions"] == [f"ssd-small-v{served}"]

        retrieve_predictions(api, project_id)
        first = check_predictions_equal_detect(api, service, tasks, headers)

        # annotators save STREAM_IMAGES annotations: one label-studio job trains on them and publishes
        annotated = {tasks[k]["id"]: annotate(api, tasks[k], IMAGES[k]) for k in range(STREAM_IMAGES)}
        job = wait_for(lambda: [j for j in label_studio_jobs(service, headers) if j["status"] not in
                                ("queued", "running")], 300, "no label-studio job finished")[0]
        assert job["status"] == "succeeded", job
        assert job["source"] == "label-studio" and job["num_images"] == STREAM_IMAGES
        assert {(o["task_id"], o["annotation_id"]) for o in job["label_studio"]} == set(annotated.items())
        assert {o["project_id"] for o in job["label_studio"]} == {project_id}
        assert job["evaluation"]["decision"] in ("published", "ungated")
        newer = f"ssd-small-v{job['model_version']}"
        assert newer != first
        listed = httpx.get(f"{service.url}/finetune", params={"source": "api"}, timeout=10).json()
        assert listed["total"] == 0  # the filter: no POST /finetune job was sent

        # the labelling stream (what the UI reads) pre-fills the newest version's prediction
        next_task = api.get(f"/api/projects/{project_id}/next/").json()
        assert next_task["id"] not in annotated
        assert [p["model_version"] for p in next_task["predictions"]] == [newer], next_task["predictions"]

        # "Start Training": the service pulls the project's annotated tasks and trains on them
        assert api.post(f"/api/ml/{backend['id']}/train").status_code == 200
        retrained = wait_for(lambda: [j for j in label_studio_jobs(service, headers)
                                      if j["job_id"] != job["job_id"] and j["status"] not in ("queued", "running")],
                             300, "Start Training queued no job")[0]
        assert retrained["status"] == "succeeded", retrained
        assert {o["task_id"] for o in retrained["label_studio"]} == set(annotated)

        forged_trains_nothing(service, tasks, headers)


def forged_trains_nothing(service: LiveService, tasks: list[dict], headers: dict) -> None:
    """A webhook naming an annotation Label Studio does not have (with a made-up result) trains nothing."""
    jobs_before = len(label_studio_jobs(service, headers))
    not_found = metric(service, "ssd_label_studio_annotations_total", outcome="not_found")
    forged = {"action": "ANNOTATION_CREATED", "project": {"id": tasks[-1]["project"]},
              "task": {"id": tasks[-1]["id"], "data": tasks[-1]["data"]},
              "annotation": {"id": 987_654, "task": tasks[-1]["id"], "result": rectangles(IMAGES[len(IMAGES) - 1])}}
    for _ in range(STREAM_IMAGES):  # enough to fill a batch, were they believed
        started = time.perf_counter()
        answer = httpx.post(f"{service.url}/labelstudio/webhook", json=forged, timeout=5)
        assert answer.status_code == 200 and answer.json() == {"status": "queued"}
        assert time.perf_counter() - started < 1.0  # Label Studio's timeout
    wait_for(lambda: metric(service, "ssd_label_studio_annotations_total", outcome="not_found") >= not_found + 4,
             60, "the forged webhooks were not all checked with Label Studio")
    assert metric(service, "ssd_label_studio_pending_images") == 0
    time.sleep(1.5)  # the intake's idle flush
    assert len(label_studio_jobs(service, headers)) == jobs_before


def test_without_token(label_studio, tmp_path):
    env = {**SERVICE_ENV, "SSD_LABEL_STUDIO_URL": label_studio.url, "SSD_LABEL_STUDIO_API_KEY": LEGACY_TOKEN}
    with run_service(tmp_path, **env) as service, label_studio.api() as api:
        project_id, tasks = create_project(api, "without token")
        answer = connect(api, project_id, service, password=None)
        assert answer.status_code == 201 and answer.json()["state"] == "CO", answer.text
        retrieve_predictions(api, project_id)
        check_predictions_equal_detect(api, service, tasks, {})
        forged_trains_nothing(service, tasks, {})
