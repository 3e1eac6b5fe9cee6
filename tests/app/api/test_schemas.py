"""LossOptions bounds equal MultiBoxLoss's: every option at its edges, through POST /score-loss."""

from __future__ import annotations

import json

import pytest

from ssd_core import MultiBoxLoss
from tests.app.api.routes.test_score_loss import NUM_CLASSES, good
from tests.app.conftest import labelled

SEED_ARGS = dict(overlap_thresh=0.5, prior_for_matching=True, bkg_label=0, neg_mining=True, neg_pos=3,
                 neg_overlap=0.5, encode_target=False)

EDGES = [
    ("overlap_thresh", 0), ("overlap_thresh", -0.1), ("overlap_thresh", 1e-9), ("overlap_thresh", 1),
    ("overlap_thresh", 1.0000001),
    ("neg_overlap", 0), ("neg_overlap", -0.1), ("neg_overlap", 1e-9), ("neg_overlap", 1), ("neg_overlap", 1.5),
    ("neg_pos", -1), ("neg_pos", 0), ("neg_pos", 10**6),
    ("variance", [0, 0.2]), ("variance", [0.1, 0]), ("variance", [-0.1, 0.2]), ("variance", [1e-6, 1e-6]),
    ("variance", [0.1, 1e300]),
    ("bkg_label", -1), ("bkg_label", 0), ("bkg_label", NUM_CLASSES - 1), ("bkg_label", NUM_CLASSES),
    ("loc_weight", -1e-9), ("loc_weight", 0),
    ("match_type", "bipartite"), ("match_type", "per_prediction"), ("match_type", "greedy"),
]


def loss_accepts(name: str, value) -> bool:
    """Whether MultiBoxLoss's constructor takes this option value (the reference bounds)."""
    positional = {**SEED_ARGS, name: value} if name in SEED_ARGS else SEED_ARGS
    keyword = {} if name in SEED_ARGS else {name: value}
    try:
        MultiBoxLoss(NUM_CLASSES, *positional.values(), **keyword)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("name", "value"), EDGES, ids=[f"{n}={v}" for n, v in EDGES])
def test_option_bounds_match_the_loss(client, name, value):
    response = client.post("/score-loss", json={**good(), "options": {name: value}})
    if loss_accepts(name, value):
        assert response.status_code == 200, response.text
    else:
        assert_option_error(response, name)


def assert_option_error(response, name: str) -> None:
    """A 422 naming the option (`options.variance[0]` for an item of the pair)."""
    assert response.status_code == 422, response.text
    field = response.json()["error"]["field"]
    assert field == f"options.{name}" or field.startswith(f"options.{name}["), field


def post_raw_option(client, name: str, token: str):
    """POST a good body whose option `name` is the raw JSON text `token` (1e400, NaN, a list, ...)."""
    body = json.dumps({**good(), "options": {name: "__RAW__"}}).replace('"__RAW__"', token)
    return client.post("/score-loss", content=body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("token", ["1e400", "-1e400", "NaN", "Infinity"])
@pytest.mark.parametrize("name", ["overlap_thresh", "neg_overlap", "neg_pos", "loc_weight"])
def test_non_finite_option_is_named(client, name, token):
    assert_option_error(post_raw_option(client, name, token), name)


@pytest.mark.parametrize("token", ["[1e400, 0.2]", "[0.1, NaN]", "[0.1]", "[0.1, 0.2, 0.3]"])
def test_bad_variance_is_named(client, token):
    assert_option_error(post_raw_option(client, "variance", token), "variance")


@pytest.mark.parametrize("bkg_label", [0, NUM_CLASSES - 1, NUM_CLASSES, 10**6])
def test_bkg_label_bound_in_the_image_form(client, shapes, bkg_label):
    response = client.post("/score-loss", json={"images": labelled(shapes, (0,)), "options": {"bkg_label": bkg_label}})
    if loss_accepts("bkg_label", bkg_label):
        assert response.status_code == 200, response.text
    else:
        assert_option_error(response, "bkg_label")
