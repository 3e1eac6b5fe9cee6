"""Labelled-image sanity (the one path of /finetune and the /score-loss image form): boxes under 1 px,
boxes beyond their image by more than 1 px and jobs without any box are refused, naming image and box."""

from __future__ import annotations

import json

import pytest

from tests.app.conftest import assert_error, labelled, png_bytes


def with_box(item: dict, box: list[float]) -> dict:
    return {**item, "boxes": [box], "labels": [0]}


@pytest.mark.parametrize(("box", "hint"), [
    ([0.1, 0.1, 0.5, 0.5], "normalised coordinates? multiply x by 64 and y by 64"),  # normalised sent as pixels
    ([10, 10, 10.5, 30], "0.5x20 px, under 1 px wide or high"),
    ([-3, 10, 20, 30], "reaches 3 px beyond the 64x64 image"),
    ([10, 10, 30, 66], "reaches 2 px beyond the 64x64 image"),
])
@pytest.mark.parametrize("route", ["/finetune", "/score-loss"])
def test_implausible_boxes_are_refused_naming_image_and_box(client, unchanged, shapes, box, hint, route):
    items = labelled(shapes)
    items[1] = {**items[1], "boxes": [*items[1]["boxes"], box], "labels": [*items[1]["labels"], 0]}
    error = assert_error(client.post(route, json={"images": items}), 422, "images[1].boxes", "invalid_value")
    assert error["message"].startswith(f"images[1].boxes: images[1].boxes[{len(items[1]['boxes']) - 1}] = ")
    assert hint in error["message"], error


def test_multipart_names_the_annotation(client, unchanged, shapes):
    files = [("images", (f"{k}.png", png_bytes(shapes, k), "image/png")) for k in (0, 1)]
    notes = [{"boxes": shapes[0].boxes.tolist(), "labels": shapes[0].labels.tolist()},
             {"boxes": [[0.1, 0.2, 0.3, 0.4]], "labels": [1]}]
    response = client.post("/finetune", files=files, data={"annotations": json.dumps(notes)})
    error = assert_error(response, 422, "annotations[1].boxes")
    assert "annotations[1].boxes[0] = " in error["message"] and "normalised coordinates?" in error["message"]


@pytest.mark.parametrize("route", ["/finetune", "/score-loss"])
def test_a_batch_without_any_box_is_refused(client, unchanged, shapes, route):
    items = [{**item, "boxes": [], "labels": []} for item in labelled(shapes)]
    error = assert_error(client.post(route, json={"images": items}), 422, "images")
    assert "none of the 2 images holds a box" in error["message"]


def test_background_only_images_beside_annotated_ones_train(client, shapes):
    items = labelled(shapes)
    items[1] = {**items[1], "boxes": [], "labels": []}
    job = client.post("/finetune?wait=true", json={"images": items, "steps": 1})
    assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text
    assert client.version == 1


def test_an_overhang_within_1px_is_clipped(client, shapes):
    """A box reaching 1 px beyond the image scores exactly as the box clipped to the image."""
    item = labelled(shapes)[0]
    score = lambda box: client.post("/score-loss", json={"images": [with_box(item, box)]})  # noqa: E731
    over, clipped = score([-1.0, 20, 30, 64.9]), score([0.0, 20, 30, 64])
    assert over.status_code == 200, over.text
    assert over.json() == clipped.json()
    assert over.json() != score([1.0, 20, 30, 63]).json()  # the comparison can tell boxes apart
