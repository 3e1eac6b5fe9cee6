"""Labelled-image sanity (the one path of /finetune and the /score-loss image form): boxes under 1 px,
boxes beyond their image by more than 1 px and jobs without any box are refused, naming image and box."""

from __future__ import annotations

import json

import pytest

from ssd_core.data.images import encode_png
from ssd_core.data.synthetic import ShapesDataset
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


# ---- every limit names the setting that raises it


def test_the_limits_name_their_settings(client, unchanged, shapes):
    items = labelled(shapes, range(5))  # the test settings allow 4 images and 200 x 200 pixels
    error = assert_error(client.post("/detect", json={"images": [{"image": i["image"]} for i in items]}), 422, "images")
    assert "5 images exceed the limit of 4 (SSD_MAX_IMAGES_PER_REQUEST)" in error["message"]
    many = {**items[0], "boxes": [[1, 1, 9, 9]] * 1001, "labels": [0] * 1001}
    error = assert_error(client.post("/score-loss", json={"images": [many]}), 422, "images[0].boxes")
    assert "1001 boxes exceed the limit of 1000 (SSD_MAX_BOXES_PER_IMAGE)" in error["message"]
    large = ShapesDataset(1, image_size=256)[0].image
    response = client.post("/detect", files=[("images", ("big.png", encode_png(large), "image/png"))])
    error = assert_error(response, 422, "images[0]", "invalid_image")
    assert "exceeds the limit of 40000 (SSD_MAX_IMAGE_PIXELS; or send the image scaled down)" in error["message"]
    error = assert_error(client.post("/finetune", json={"images": items[:2], "steps": 201}), 422, "steps")
    assert "201 exceeds the limit of 200 (SSD_FINETUNE_MAX_STEPS)" in error["message"]
    response = client.post("/detect", content=b"{" + b" " * (4 * 2**20), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "(SSD_MAX_BODY_BYTES)" in response.json()["error"]["message"]


def test_pixel_boxes_in_a_normalised_form_are_told_so(client, unchanged):
    body = {"predictions": {"loc": [[[0, 0, 0, 0], [0, 0, 0, 0]]], "conf": [[[0] * 4, [0] * 4]]},
            "targets": [[{"box": [10, 12, 50, 60], "label": 0}]],  # pixels, where [0, 1] is expected
            "priors": [[0.3, 0.3, 0.4, 0.4], [0.7, 0.7, 0.2, 0.2]]}
    error = assert_error(client.post("/score-loss", json=body), 422, "targets[0]")
    assert "lies entirely outside the 1x1 image (these boxes are normalised to [0, 1]: pixels? divide x by the " \
           "image's width and y by its height)" in error["message"], error


@pytest.mark.parametrize("sent", ["shapes.jpg", "/home/me/shapes.png", "https://example.org/shapes.png",
                                  "C:\\images\\shapes.png"])
def test_a_file_name_or_url_instead_of_base64_says_how_to_send_the_image(client, unchanged, sent):
    error = assert_error(client.post("/detect", json={"images": [{"image": sent}]}), 422, "images[0].image")
    assert f"'{sent}' looks like a file name, path or URL, not an image" in error["message"]
    assert "base64 -w0" in error["message"] and "curl -F images=@" in error["message"]
    assert "Incorrect padding" not in error["message"]


def test_broken_base64_says_what_base64_is_expected(client, unchanged, shapes):
    cut = labelled(shapes)[0]["image"][:-1]  # one character short: the padding is wrong
    error = assert_error(client.post("/detect", json={"images": [{"image": cut}]}), 422, "images[0].image")
    assert error["message"].startswith("images[0].image: not valid base64 (") and "base64 -w0" in error["message"]
