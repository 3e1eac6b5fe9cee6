"""Partial labels over HTTP: `labelled_classes` in every /score-loss form and in /finetune (job and
image), equal to MultiBoxLoss with the same class mask, and every bad value named."""

from __future__ import annotations

import json

import pytest
import torch

from ssd_core import MultiBoxLoss
from ssd_core.data.datasets import collate
from ssd_core.loss.partial_labels import labelled_class_mask
from tests.app.api.routes.test_score_loss import (
    NUM_CLASSES,
    PRIORS,
    as_json,
    as_safetensors,
    post_binary,
    random_batch,
)
from tests.app.conftest import CriterionSpy, assert_error, labelled, png_bytes
from tests.app.online.test_worker import wait_for


def declared_for(targets) -> list[list[int] | None]:
    """Image 0 declares exactly its own labels, image 1 every class (null)."""
    return [sorted({int(v) for v in targets[0][:, 4]}), None]


def masked_loss(loc, conf, targets, labelled_classes, bkg_label=0):
    criterion = MultiBoxLoss(NUM_CLASSES, 0.5, True, bkg_label, True, 3, 0.5, False)
    mask = labelled_class_mask(labelled_classes, NUM_CLASSES, bkg_label)
    return criterion.compute((loc, conf, PRIORS), targets, mask)


def assert_losses(body, expected):
    assert body["loss_l"] == pytest.approx(float(expected.loss_l), rel=1e-5)
    assert body["loss_c"] == pytest.approx(float(expected.loss_c), rel=1e-5)
    assert body["num_negatives"] == int(expected.stats.num_negatives.sum())


@pytest.mark.parametrize("bkg_label", [0, 2])
def test_json_and_binary_forms_equal_the_masked_loss(client, bkg_label):
    loc, conf, targets = random_batch()
    declared = declared_for(targets)
    expected = masked_loss(loc, conf, targets, declared, bkg_label)
    assert float(expected.loss_c) != pytest.approx(float(masked_loss(loc, conf, targets, [None, None]).loss_c))
    options = {"bkg_label": bkg_label}
    response = client.post("/score-loss", json=as_json(loc, conf, targets, labelled_classes=declared,
                                                       options=options))
    assert response.status_code == 200, response.text
    assert_losses(response.json(), expected)
    metadata = {"labelled_classes": json.dumps(declared), "bkg_label": str(bkg_label)}
    response = post_binary(client, as_safetensors(loc, conf, targets, metadata))
    assert response.status_code == 200, response.text
    assert_losses(response.json(), expected)


def test_image_form_equals_the_masked_loss_of_the_served_model(client, shapes):
    items = labelled(shapes)
    items[0]["labelled_classes"] = sorted(set(items[0]["labels"]))
    response = client.post("/score-loss", json={"images": items})
    assert response.status_code == 200, response.text
    host = client.app.state.host
    images, targets = collate([shapes[0], shapes[1]], host.spec)
    with torch.inference_mode():
        loc, conf, priors = host.predict(images, host.current)
    criterion = MultiBoxLoss.ssd_pytorch(NUM_CLASSES)
    mask = labelled_class_mask([items[0]["labelled_classes"], None], NUM_CLASSES)
    assert_losses(response.json(), criterion.compute((loc, conf, priors), targets, mask))
    plain = client.post("/score-loss", json={"images": labelled(shapes)}).json()
    assert plain["loss_c"] != pytest.approx(response.json()["loss_c"])


def test_score_loss_bad_labelled_classes_are_named(client, unchanged, shapes):
    loc, conf, targets = random_batch()
    first = int(targets[0][0, 4])
    other = (first + 1) % (NUM_CLASSES - 1)
    cases = [
        ([None], "labelled_classes"),
        ([[3], None], "labelled_classes[0][0]"),
        ([[0, -1], None], "labelled_classes[0][1]"),
        ([[other], None], "targets[0][0].label"),
    ]
    for declared, field in cases:
        assert_error(client.post("/score-loss", json=as_json(loc, conf, targets, labelled_classes=declared)), 422,
                     field)
    for text, field in (("[[9], null]", "__metadata__.labelled_classes[0][0]"), ("{", "__metadata__.labelled_classes"),
                        (json.dumps([[other], None]), "targets[0][0]"), ('"x"', "__metadata__.labelled_classes")):
        body = as_safetensors(loc, conf, targets, {"labelled_classes": text})
        assert_error(post_binary(client, body), 422, field)
    items = labelled(shapes)
    label = items[0]["labels"][0]
    for change, field in (
        ({"labelled_classes": [7]}, "images[0].labelled_classes[0]"),
        ({"labelled_classes": [(label + 1) % 3]}, "images[0].labels[0]"),
    ):
        assert_error(client.post("/score-loss", json={"images": [{**items[0], **change}, items[1]]}), 422, field)
    assert_error(client.post("/score-loss", json={"images": items, "labelled_classes": [None, None]}), 422,
                 "labelled_classes")


def test_finetune_passes_job_and_image_labelled_classes_to_the_loss(client, shapes):
    spy = CriterionSpy.install(client)
    items = labelled(shapes, (0, 1, 2))
    job_level = sorted(set(items[0]["labels"]) | set(items[1]["labels"]))
    items[2]["labelled_classes"] = [0, 1, 2]  # the image's own overrides the job's
    response = client.post("/finetune?wait=true", json={"images": items, "steps": 2, "labelled_classes": job_level})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    expected = labelled_class_mask([job_level, job_level, [0, 1, 2]], NUM_CLASSES).tolist()
    assert spy.masks and all(mask == expected for mask in spy.masks)  # every step (and its verification)

    spy.masks.clear()
    # replay 0: the replay memory now holds the first job's images, which would bring their masks along
    assert client.post("/finetune?wait=true", json={"images": labelled(shapes), "steps": 1, "replay": 0}).status_code == 200
    assert spy.masks and all(mask is None for mask in spy.masks)  # nothing declared: the default path


def test_finetune_multipart_job_labelled_classes(client, shapes):
    spy = CriterionSpy.install(client)
    notes = [{"boxes": shapes[i].boxes.tolist(), "labels": shapes[i].labels.tolist()} for i in (0, 1)]
    declared = sorted(set(notes[0]["labels"]) | set(notes[1]["labels"]))
    files = [("images", (f"{i}.png", png_bytes(shapes, i), "image/png")) for i in (0, 1)]
    response = client.post("/finetune", files=files, data={
        "annotations": json.dumps(notes), "labelled_classes": json.dumps(declared)})
    assert response.status_code == 202, response.text
    assert wait_for(client, response.json()["job_id"], {"succeeded"})["steps_done"] == 1
    assert spy.masks[0] == labelled_class_mask([declared, declared], NUM_CLASSES).tolist()


def test_finetune_bad_labelled_classes_are_named(client, unchanged, shapes):
    items = labelled(shapes)
    label = items[1]["labels"][0]
    fully_declared = {**items[0], "labelled_classes": items[0]["labels"]}
    cases = [
        ({"labelled_classes": [3]}, "labelled_classes[0]"),
        # the job's default leaves image 1's first box undeclared
        ({"labelled_classes": [(label + 1) % 3], "images": [fully_declared, items[1]]}, "images[1].labels[0]"),
        ({"images": [items[0], {**items[1], "labelled_classes": [-2]}]}, "images[1].labelled_classes[0]"),
    ]
    for change, field in cases:
        assert_error(client.post("/finetune", json={"images": items, **change}), 422, field)
    files = [("images", (f"{i}.png", png_bytes(shapes, i), "image/png")) for i in (0, 1)]
    notes = [{"boxes": shapes[i].boxes.tolist(), "labels": shapes[i].labels.tolist()} for i in (0, 1)]
    assert_error(client.post("/finetune", files=files, data={"annotations": json.dumps(notes),
                                                             "labelled_classes": "[0,"}), 400, "labelled_classes")
    bad_note = [notes[0], {**notes[1], "labelled_classes": [(label + 1) % 3]}]
    assert_error(client.post("/finetune", files=files, data={"annotations": json.dumps(bad_note)}), 422,
                 "annotations[1].labels[0]")
