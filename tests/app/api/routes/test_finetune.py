"""The /finetune routes (app.api.routes.finetune): the multipart form, unknown jobs and every bad input, which
leaves the model, its version and the queue untouched."""

from __future__ import annotations

import json

from tests.app.conftest import assert_error, labelled, png_bytes


def test_multipart_upload(client, shapes):
    annotations = [{"boxes": shapes[i].boxes.tolist(), "labels": shapes[i].labels.tolist()} for i in (0, 1)]
    files = [("images", (f"{i}.png", png_bytes(shapes, i), "image/png")) for i in (0, 1)]
    response = client.post("/finetune?wait=true", files=files,
                           data={"annotations": json.dumps(annotations), "steps": "2", "learning_rate": "0.002"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded" and job["num_images"] == 2 and job["learning_rate"] == 0.002
    assert client.version == 2


def test_unknown_job(client):
    assert_error(client.get("/finetune/nope"), 404, "job_id", "not_found")
    assert_error(client.delete("/finetune/nope"), 404, "job_id", "not_found")


# ---- bad input leaves the model, its version and the queue untouched


def test_bad_json_requests(client, unchanged, shapes):
    items = labelled(shapes)
    cases = [
        ({"images": items, "steps": 0}, "steps"),
        ({"images": items, "steps": 201}, "steps"),
        ({"images": items, "learning_rate": -1}, "learning_rate"),
        ({"images": items, "learning_rate": "fast"}, "learning_rate"),
        ({"images": []}, "images"),
        ({"images": items * 3}, "images"),
        ({"images": [{**items[0], "labels": [0]}] if len(items[0]["labels"]) != 1 else [{**items[0], "labels": []}]},
         "images[0].labels"),
        ({"images": [{**items[0], "labels": [3] * len(items[0]["labels"])}]}, "images[0].labels[0]"),
        ({"images": [{**items[0], "boxes": [[5, 5, 5, 9]] * len(items[0]["boxes"])}]}, "images[0].boxes"),
        ({"images": [{**items[0], "boxes": [[1, 2, 3]] * len(items[0]["boxes"])}]}, "images[0].boxes[0]"),
        ({"images": [{**items[0], "image": "aGVsbG8="}]}, "images[0].image"),
        ({"images": items, "colour": "red"}, "colour"),
        ({"images": items[:1]}, "images"),  # ssd-small's BatchNorm needs two images
    ]
    for body, field in cases:
        assert_error(client.post("/finetune", json=body), 422, field)
    assert_error(client.post("/finetune", content=b"{", headers={"Content-Type": "application/json"}),
                 400, "body", "invalid_json")


def test_bad_multipart_requests(client, unchanged, shapes):
    files = [("images", ("0.png", png_bytes(shapes, 0), "image/png"))]
    note = [{"boxes": shapes[0].boxes.tolist(), "labels": shapes[0].labels.tolist()}]
    assert_error(client.post("/finetune", files=files), 422, "annotations")
    assert_error(client.post("/finetune", files=files, data={"annotations": "[{"}), 400, "annotations")
    assert_error(client.post("/finetune", files=files, data={"annotations": json.dumps(note * 2)}), 422, "annotations")
    bad_label = [{**note[0], "labels": [9] * len(note[0]["labels"])}]
    assert_error(client.post("/finetune", files=files, data={"annotations": json.dumps(bad_label)}), 422,
                 "annotations[0].labels[0]")
    assert_error(client.post("/finetune", files=files, data={"annotations": json.dumps(note), "steps": "x"}), 422,
                 "steps")
    garbage = [("images", ("0.png", b"\x89PNG garbage", "image/png"))]
    assert_error(client.post("/finetune", files=garbage, data={"annotations": json.dumps(note)}), 422, "images[0]",
                 "invalid_image")


def test_list_jobs_newest_first_filtered_and_paged(client, shapes):
    body = {"images": labelled(shapes), "steps": 1}
    ids = [client.post("/finetune?wait=true", json=body).json()["job_id"] for _ in range(3)]
    listed = client.get("/finetune").json()
    assert [job["job_id"] for job in listed["jobs"]] == ids[::-1] and listed["total"] == 3
    assert {job["source"] for job in listed["jobs"]} == {"api"} and listed["jobs"][0]["label_studio"] is None
    page = client.get("/finetune", params={"limit": 1, "offset": 1}).json()
    assert [job["job_id"] for job in page["jobs"]] == [ids[1]] and page["total"] == 3
    assert client.get("/finetune", params={"status": "succeeded", "source": "api"}).json()["total"] == 3
    assert client.get("/finetune", params={"status": "failed"}).json() == {"jobs": [], "total": 0, "offset": 0,
                                                                           "limit": 20}
    assert client.get("/finetune", params={"source": "label-studio"}).json()["total"] == 0
    assert_error(client.get("/finetune", params={"status": "done"}), 422, "query.status")
    assert_error(client.get("/finetune", params={"source": "ui"}), 422, "query.source")
    assert_error(client.get("/finetune", params={"limit": 101}), 422, "query.limit")
