"""POST /score-loss: JSON, safetensors and image forms against MultiBoxLoss itself, and every bad input."""

from __future__ import annotations

import base64
import json

import pytest
import safetensors.torch
import torch

from app.api.loss_batch import _first_non_finite
from ssd_core import MultiBoxLoss
from ssd_core.data.datasets import collate
from ssd_core.data.images import encode_png
from ssd_core.models import build_model
from tests.app.conftest import assert_error, labelled

NUM_CLASSES = 4
PRIORS = build_model("ssd-small", NUM_CLASSES).priors  # [P, 4], what the app serves


def random_batch(batch: int = 2, seed: int = 0):
    """loc [B, P, 4], conf [B, P, C] and per-image targets [n, 6] (normalised boxes, label, difficult)."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, PRIORS.shape[0], 4, generator=g)
    conf = torch.randn(batch, PRIORS.shape[0], NUM_CLASSES, generator=g)
    targets = []
    for b in range(batch):
        n = 1 + b
        xy = torch.rand(n, 2, generator=g) * 0.5
        wh = 0.1 + torch.rand(n, 2, generator=g) * 0.4
        labels = torch.randint(0, NUM_CLASSES - 1, (n, 1), generator=g).float()
        targets.append(torch.cat((xy, xy + wh, labels, torch.zeros(n, 1)), dim=1))
    return loc, conf, targets


def as_json(loc, conf, targets, **extra) -> dict:
    return {
        "predictions": {"loc": loc.tolist(), "conf": conf.tolist()},
        "targets": [[{"box": row[:4], "label": int(row[4]), "difficult": bool(row[5])} for row in t.tolist()]
                    for t in targets],
        **extra,
    }


def as_safetensors(loc, conf, targets, metadata=None, **tensors) -> bytes:
    padded = torch.full((len(targets), max(len(t) for t in targets), 6), -1.0)
    for b, t in enumerate(targets):
        padded[b, : len(t)] = t
    return safetensors.torch.save({"loc": loc, "conf": conf, "targets": padded, **tensors}, metadata=metadata)


def post_binary(client, body: bytes):
    return client.post("/score-loss", content=body, headers={"Content-Type": "application/octet-stream"})


def seed_loss(loc, conf, targets, priors=PRIORS, **options):
    criterion = MultiBoxLoss(NUM_CLASSES, options.pop("overlap_thresh", 0.5), True, 0, True,
                             options.pop("neg_pos", 3), 0.5, False, **options)
    return criterion.compute((loc, conf, priors), targets)


def assert_matches(body: dict, expected) -> None:
    loss_l, loss_c = float(expected.loss_l), float(expected.loss_c)
    assert body["loss_l"] == pytest.approx(loss_l, rel=1e-5)
    assert body["loss_c"] == pytest.approx(loss_c, rel=1e-5)
    assert body["loss"] == pytest.approx(loss_l + loss_c, rel=1e-5)
    assert body["num_positives"] == int(expected.stats.num_positives.sum())
    assert body["num_negatives"] == int(expected.stats.num_negatives.sum())
    expected_images = expected.stats.per_image()
    assert len(body["per_image"]) == len(expected_images)
    for got, want in zip(body["per_image"], expected_images, strict=True):
        assert got.keys() == want.keys()
        assert got == {key: pytest.approx(value, rel=1e-5) for key, value in want.items()}
    assert_per_class(body, expected)


CLASS_NAMES = ["rectangle", "ellipse", "triangle"]  # the test settings'


def assert_per_class(body: dict, expected) -> None:
    """`per_class` and `loss_c_negatives` equal MultiBoxLoss's per-class statistics."""
    per_class = expected.stats.per_class
    want_rows = per_class.rows(CLASS_NAMES)
    assert [row["label"] for row in body["per_class"]] == [0, 1, 2]
    for got, want in zip(body["per_class"], want_rows, strict=True):
        assert got.keys() == want.keys()
        assert got["class_name"] == want["class_name"]
        assert got == {key: value if key == "class_name" else pytest.approx(value, rel=1e-5, abs=1e-7)
                       for key, value in want.items()}
    negatives = float(per_class.negative_loss_c_sum / per_class.normalizer)
    assert body["loss_c_negatives"] == pytest.approx(negatives, rel=1e-5)
    assert sum(row["loss_c"] for row in body["per_class"]) + negatives == pytest.approx(body["loss_c"], rel=1e-5)
    assert sum(row["num_positives"] for row in body["per_class"]) == body["num_positives"]


def test_json_equals_multibox_loss(client):
    loc, conf, targets = random_batch()
    response = client.post("/score-loss", json=as_json(loc, conf, targets))
    assert response.status_code == 200, response.text
    body = response.json()
    assert_matches(body, seed_loss(loc, conf, targets))
    assert body["model_version"] == 0
    assert sum(image["loss_l"] for image in body["per_image"]) == pytest.approx(body["loss_l"], rel=1e-5)


def test_json_options_and_explicit_priors(client):
    loc, conf, targets = random_batch(seed=1)
    priors = PRIORS[:500]
    loc, conf = loc[:, :500], conf[:, :500]
    options = {"match_type": "bipartite", "neg_pos": 2, "overlap_thresh": 0.4, "variance": [0.1, 0.2]}
    response = client.post("/score-loss", json=as_json(loc, conf, targets, priors=priors.tolist(), options=options))
    assert response.status_code == 200, response.text
    assert_matches(response.json(), seed_loss(loc, conf, targets, priors, match_type="bipartite", neg_pos=2,
                                              overlap_thresh=0.4))


def test_binary_equals_json_and_multibox_loss(client):
    loc, conf, targets = random_batch(batch=3, seed=2)
    metadata = {"match_type": "bipartite", "neg_pos": "2"}  # JSON strings; a bare string is itself
    binary = post_binary(client, as_safetensors(loc, conf, targets, metadata))
    assert binary.status_code == 200, binary.text
    assert_matches(binary.json(), seed_loss(loc, conf, targets, match_type="bipartite", neg_pos=2))
    json_form = client.post("/score-loss", json=as_json(loc, conf, targets, options={"match_type": "bipartite",
                                                                                      "neg_pos": 2}))
    assert json_form.json()["loss"] == pytest.approx(binary.json()["loss"], rel=1e-6)


def test_binary_five_columns_and_difficult_flag(client):
    loc, conf, targets = random_batch(seed=4)
    targets[1][0, 5] = 1.0  # difficult: its priors are neither positive nor negative
    five = [t[:, :5] for t in targets]
    body = post_binary(client, safetensors.torch.save({"loc": loc, "conf": conf, "targets": torch.stack(
        [torch.nn.functional.pad(t, (0, 0, 0, 2 - len(t)), value=-1.0) for t in five])}))
    assert body.status_code == 200, body.text
    assert_matches(body.json(), seed_loss(loc, conf, five))
    difficult = post_binary(client, as_safetensors(loc, conf, targets))
    assert_matches(difficult.json(), seed_loss(loc, conf, targets))
    assert difficult.json()["loss"] != pytest.approx(body.json()["loss"])


def test_score_records_metrics(client):
    loc, conf, targets = random_batch()
    expected = seed_loss(loc, conf, targets)
    client.post("/score-loss", json=as_json(loc, conf, targets))
    assert client.sample("ssd_loss_loc_count", source="score") == 1
    assert client.sample("ssd_loss_loc_sum", source="score") == pytest.approx(float(expected.loss_l), rel=1e-5)
    assert client.sample("ssd_positives_per_image_count", source="score") == 2
    assert client.sample("ssd_ground_truth_boxes_total", source="score") == 3
    assert client.sample("ssd_matched_iou_count", source="score") == int(expected.stats.num_positives.sum())
    assert client.sample("ssd_loss_loc_count", source="finetune") == 0
    per_class = expected.stats.per_class
    for label, name in enumerate(CLASS_NAMES):
        by_class = {"class": name, "source": "score"}
        assert client.sample("ssd_class_ground_truth_boxes_total", **by_class) == per_class.num_ground_truth[label]
        assert client.sample("ssd_class_positives_total", **by_class) == per_class.num_positives[label]
        assert client.sample("ssd_class_forced_matches_total", **by_class) == per_class.num_forced_matches[label]
        for metric, field in (("ssd_class_matched_iou_total", "matched_iou_sum"),
                              ("ssd_class_loss_loc_total", "loss_l_sum"), ("ssd_class_loss_conf_total", "loss_c_sum")):
            assert client.sample(metric, **by_class) == pytest.approx(float(getattr(per_class, field)[label]), rel=1e-5)


def test_image_form_runs_the_hosted_model(client, shapes):
    response = client.post("/score-loss", json={"images": labelled(shapes)})
    assert response.status_code == 200, response.text
    body = response.json()
    host = client.app.state.host
    images, targets = collate([shapes[0], shapes[1]], host.spec)
    with torch.inference_mode():
        predictions = host.predict(images, host.current)
    assert_matches(body, MultiBoxLoss(NUM_CLASSES, 0.5, True, 0, True, 3, 0.5, False).compute(predictions, targets))
    assert body["model_version"] == 0
    assert [image["num_ground_truth"] for image in body["per_image"]] == [len(shapes[0].boxes), len(shapes[1].boxes)]
    assert body["loss"] > 0
    assert client.sample("ssd_images_processed_total", route="/score-loss") == 2


# ---- bad input: a 4xx naming the field, nothing changed


def good() -> dict:
    loc, conf, targets = random_batch(batch=2, seed=5)
    return as_json(loc, conf, targets)


def with_change(change) -> dict:
    body = good()
    change(body)
    return body


BAD_JSON = [
    ("loc not [B][P][4]", lambda b: b["predictions"]["loc"][0][3].append(0.5), "predictions.loc[0][3]"),
    ("loc ragged P", lambda b: b["predictions"]["loc"][1].pop(), "predictions.loc[1]"),
    ("loc not nested", lambda b: b["predictions"].update(loc=[1.0, 2.0]), "predictions.loc[0]"),
    ("P != priors", lambda b: [rows.pop() for rows in b["predictions"]["loc"] + b["predictions"]["conf"]],
     "predictions.loc"),
    ("conf C != num_classes", lambda b: [row.append(0.0) for rows in b["predictions"]["conf"] for row in rows],
     "predictions.conf"),
    ("conf B != loc B", lambda b: b["predictions"]["conf"].pop(), "predictions.conf"),
    ("targets B != predictions B", lambda b: b["targets"].pop(), "targets"),
    ("x2 <= x1", lambda b: b["targets"][0][0].update(box=[0.5, 0.1, 0.4, 0.3]), "targets[0]"),
    ("y2 <= y1", lambda b: b["targets"][1][1].update(box=[0.1, 0.5, 0.4, 0.5]), "targets[1]"),
    ("box far outside", lambda b: b["targets"][0][0].update(box=[3.0, 3.0, 4.0, 4.0]), "targets[0]"),
    ("label out of range", lambda b: b["targets"][0][0].update(label=3), "targets[0][0].label"),
    ("negative label", lambda b: b["targets"][1][0].update(label=-1), "targets[1][0].label"),
    ("empty batch", lambda b: b.update(predictions={"loc": [], "conf": []}, targets=[]), "predictions.loc"),
    ("missing targets", lambda b: b.pop("targets"), "targets"),
    ("unknown option", lambda b: b.update(options={"overlap": 0.5}), "options.overlap"),
    ("option out of range", lambda b: b.update(options={"overlap_thresh": 1.5}), "options.overlap_thresh"),
    ("bkg_label >= C", lambda b: b.update(options={"bkg_label": 4}), "options.bkg_label"),
    ("priors with P mismatch", lambda b: b.update(priors=[[0.5, 0.5, 0.1, 0.1]]), "priors"),
    ("both forms", lambda b: b.update(images=[]), "predictions"),
    ("neither form", lambda b: [b.pop("predictions"), b.pop("targets")], "body"),
]


@pytest.mark.parametrize(("change", "field"), [case[1:] for case in BAD_JSON], ids=[case[0] for case in BAD_JSON])
def test_bad_json_field_is_named(client, unchanged, change, field):
    assert_error(client.post("/score-loss", json=with_change(change)), 422, field)


def with_raw_number(body: dict, path: tuple, token: str) -> str:
    """The JSON text of `body` with the number at `path` replaced by a raw token (NaN, 1e400, ...)."""
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "__NUMBER__"
    return json.dumps(body).replace('"__NUMBER__"', token)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize(("path", "field"), [
    (("predictions", "loc", 0, 0, 1), "predictions.loc[0][0][1]"),
    (("predictions", "conf", 1, 5, 2), "predictions.conf[1][5][2]"),
    (("targets", 0, 0, "box", 0), "targets[0][0].box[0]"),
])
def test_non_finite_numbers(client, unchanged, token, path, field):
    text = with_raw_number(good(), path, token)
    response = client.post("/score-loss", content=text, headers={"Content-Type": "application/json"})
    assert_error(response, 422, field)


def test_invalid_json(client, unchanged):
    assert_error(client.post("/score-loss", content=b'{"predictions": [', headers={"Content-Type": "application/json"}),
                 400, "body", "invalid_json")
    assert_error(client.post("/score-loss", content=b"", headers={"Content-Type": "application/json"}),
                 400, "body", "invalid_json")


def test_wrong_content_type(client, unchanged):
    assert_error(client.post("/score-loss", content=b"x", headers={"Content-Type": "text/csv"}), 415, "Content-Type")


def test_too_many_images(client, unchanged):
    loc, conf, targets = random_batch(batch=5)  # the limit is 4
    loc, conf, priors = loc[:, :50].contiguous(), conf[:, :50].contiguous(), PRIORS[:50]
    response = client.post("/score-loss", json=as_json(loc, conf, targets, priors=priors.tolist()))
    assert_error(response, 422, "predictions.loc")
    assert_error(post_binary(client, as_safetensors(loc, conf, targets, priors=priors)), 422, "loc")


def test_body_over_limit(client, unchanged):
    body = b'{"predictions": "' + b"a" * (4 * 2**20) + b'"}'  # the limit is 4 MiB
    response = client.post("/score-loss", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 413, "body", "body_too_large")
    assert client.sample("ssd_http_requests_total", route="/score-loss", method="POST", status="413") == 1


def test_body_over_limit_when_streamed_without_length(client, unchanged):
    chunk = b" " * 2**20

    def chunks():
        for _ in range(5):
            yield chunk

    response = client.post("/score-loss", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(response, 413, "body", "body_too_large")


@pytest.mark.parametrize("body", [
    b"", b"\x00" * 4, b"\xff" * 8 + b"{}",  # header length beyond the body
    (10).to_bytes(8, "little") + b"not json!!",
    (2).to_bytes(8, "little") + b"[]",
])
def test_malformed_safetensors(client, unchanged, body):
    assert_error(post_binary(client, body), 400, "body", "invalid_safetensors")


def test_safetensors_header_lying_about_offsets(client, unchanged):
    loc, conf, targets = random_batch()
    body = as_safetensors(loc, conf, targets)
    length = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + length])
    header["loc"]["data_offsets"][1] += 10**9  # claims a gigabyte the body does not hold
    forged = json.dumps(header).encode()
    response = post_binary(client, len(forged).to_bytes(8, "little") + forged + body[8 + length:])
    assert_error(response, 400, "body", "invalid_safetensors")


def test_binary_half_precision_and_unaligned_header(client):
    """The zero-copy reader: float16 tensors, and a header whose length is not a multiple of 8 (data
    not aligned for float32 views), give the same loss as the float32 tensors."""
    loc, conf, targets = random_batch(seed=6)
    body = as_safetensors(loc, conf, targets)
    length = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + length])
    text = json.dumps(header).encode()
    unaligned = text + b" " * ((3 - len(text)) % 8)  # data starts at 8 + 8k + 3 bytes
    assert len(unaligned) % 8 == 3
    response = post_binary(client, len(unaligned).to_bytes(8, "little") + unaligned + body[8 + length:])
    assert response.status_code == 200, response.text
    assert_matches(response.json(), seed_loss(loc, conf, targets))
    half = as_safetensors(loc.half(), conf.half(), targets)
    response = post_binary(client, half)
    assert response.status_code == 200, response.text
    assert_matches(response.json(), seed_loss(loc.half().float(), conf.half().float(), targets))


def test_safetensors_gap_between_tensors_is_refused(client, unchanged):
    loc, conf, targets = random_batch()
    body = as_safetensors(loc, conf, targets)
    length = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + length])
    for entry in header.values():
        if "data_offsets" in entry:
            entry["data_offsets"] = [offset + 4 for offset in entry["data_offsets"]]  # 4 unused bytes first
    forged = json.dumps(header).encode()
    response = post_binary(client, len(forged).to_bytes(8, "little") + forged + b"\0" * 4 + body[8 + length:])
    assert_error(response, 400, "body", "invalid_safetensors")


@pytest.mark.parametrize(("tensors", "metadata", "field"), [
    ({"extra": torch.zeros(1)}, None, "extra"),
    ({"priors": torch.zeros(3, 4)}, None, "priors"),
    ({}, {"neg_pos": "-1"}, "__metadata__.neg_pos"),
    ({}, {"match_type": "greedy"}, "__metadata__.match_type"),
])
def test_binary_bad_fields(client, unchanged, tensors, metadata, field):
    loc, conf, targets = random_batch()
    assert_error(post_binary(client, as_safetensors(loc, conf, targets, metadata, **tensors)), 422, field)


def test_binary_shape_and_value_errors(client, unchanged):
    loc, conf, targets = random_batch()
    assert_error(post_binary(client, as_safetensors(loc[..., :3].contiguous(), conf, targets)), 422, "loc")
    assert_error(post_binary(client, as_safetensors(loc, conf[..., :3].contiguous(), targets)), 422, "conf")
    short = as_safetensors(loc[:, :100].contiguous(), conf[:, :100].contiguous(), targets)
    assert_error(post_binary(client, short), 422, "loc")
    bad_loc = loc.clone()
    bad_loc[1, 7, 2] = float("nan")
    assert_error(post_binary(client, as_safetensors(bad_loc, conf, targets)), 422, "loc")
    targets[1][0, 4] = 7
    assert_error(post_binary(client, as_safetensors(loc, conf, targets)), 422, "targets[1][0]")
    missing = safetensors.torch.save({"loc": loc, "conf": conf})
    assert_error(post_binary(client, missing), 422, "targets")
    ints = safetensors.torch.save({"loc": loc, "conf": conf, "targets": torch.zeros(2, 1, 5, dtype=torch.int64)})
    assert_error(post_binary(client, ints), 422, "targets")


def test_image_form_errors(client, unchanged, shapes):
    items = labelled(shapes)
    cases = [
        (lambda i: i[0].update(image=base64.b64encode(b"not an image").decode()), "images[0].image", "invalid_image"),
        (lambda i: i[1].update(image="%%% not base64 %%%"), "images[1].image", None),
        (lambda i: i[0].update(labels=i[0]["labels"] + [0]), "images[0].labels", None),
        (lambda i: i[0].update(labels=[5] * len(i[0]["labels"])), "images[0].labels[0]", None),
        (lambda i: i[1].update(boxes=[[10, 10, 5, 20]] * len(i[1]["boxes"])), "images[1].boxes", None),
        (lambda i: i[1].update(boxes=[[500, 500, 600, 600]] * len(i[1]["boxes"])), "images[1].boxes", None),
    ]
    for change, field, code in cases:
        body = json.loads(json.dumps(items))
        change(body)
        assert_error(client.post("/score-loss", json={"images": body}), 422, field, code)
    assert_error(client.post("/score-loss", json={"images": []}), 422, "images")
    assert_error(client.post("/score-loss", json={"images": items * 3}), 422, "images")


def test_image_over_pixel_limit(client, unchanged):
    big = torch.zeros(3, 256, 256, dtype=torch.uint8)  # 65536 pixels > the 40000 limit
    item = {"image": base64.b64encode(encode_png(big)).decode(), "boxes": [[1, 1, 20, 20]], "labels": [0]}
    error = assert_error(client.post("/score-loss", json={"images": [item]}), 422, "images[0].image", "invalid_image")
    assert "limit" in error["message"]


def test_non_finite_scan_is_exact_when_the_sum_overflows():
    assert _first_non_finite(torch.full((2, 3), 3e38)) is None  # the sum overflows, every element is finite
    values = torch.zeros(2, 3, 4)
    values[1, 2, 0] = float("inf")
    assert _first_non_finite(values) == [1, 2, 0]
    values[0, 1, 3] = float("nan")
    assert _first_non_finite(values) == [0, 1, 3]


def test_overflowing_loss_is_a_422(client, unchanged):
    loc, conf, targets = random_batch()
    conf[0, :, 0] = 3e38  # finite logits whose cross-entropy overflows to inf
    assert_error(post_binary(client, as_safetensors(loc, conf, targets)), 422, "predictions")
