"""A young deployment over real HTTP: a fresh server (random weights, every protection at its default), a
short warm-up that makes it competent on a small validation set, then a job whose boxes are all shifted by
half their size: screening rejects it from the first such job (no history of accepted jobs involved), and
the served version and its detections stay exactly as they were."""

from __future__ import annotations

import httpx
import pytest

from ssd_core.online.corruptions import shift_boxes
from tests.app.conftest import OVERFIT, labelled
from tests.integration.live import run_service

pytestmark = pytest.mark.integration

EVERYTHING = range(len(OVERFIT))


def detect(url: str, items: list[dict]) -> dict:
    body = {"images": [{"image": item["image"]} for item in items], "score_threshold": 0.05}
    response = httpx.post(f"{url}/detect", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def finetune(url: str, body: dict) -> dict:
    response = httpx.post(f"{url}/finetune", params={"wait": "true"}, json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_shifted_box_job_is_stopped_in_a_young_deployment(tmp_path):
    clean = labelled(OVERFIT, EVERYTHING)
    # defaults except: a short lr warm-up and EMA off (the warm-up's 60 steps show at once), no holdout (the
    # validation set is the one sent), the gate judging from 4 images
    env = {"SSD_WARMUP_STEPS": "10", "SSD_EMA_DECAY": "0", "SSD_HOLDOUT_FRACTION": "0", "SSD_GATE_MIN_IMAGES": "4"}
    with run_service(tmp_path, **env) as service:
        url = service.url
        warm = finetune(url, {"images": clean, "steps": 60, "learning_rate": 5e-3})
        assert warm["status"] == "succeeded" and warm["evaluation"]["decision"] == "ungated", warm
        assert not warm["screening"]["losses_checked"]  # nothing to compare with yet: quiet
        assert httpx.post(f"{url}/validation", json={"images": clean}, timeout=60).json()["images"] == 4
        before = detect(url, clean)
        version = before["model_version"]
        bad = labelled([shift_boxes(OVERFIT[i]) for i in EVERYTHING], EVERYTHING)
        job = finetune(url, {"images": bad, "steps": 4})
        screening = job["screening"]
        assert screening["losses_checked"], screening  # competent on its validation set after the warm-up
        assert job["status"] == "rejected" and job["steps_done"] == 0, job
        assert screening["quarantined"] == 4 and "boxes in the wrong place" in job["error"]
        after = detect(url, clean)
        assert after["model_version"] == version and after["detections"] == before["detections"]
        # the clean images again: nothing quarantined, trained, judged and published by the gate
        again = finetune(url, {"images": clean, "steps": 1, "learning_rate": 1e-5})
        assert again["status"] == "succeeded" and again["screening"]["quarantined"] == 0, again
        assert again["evaluation"]["decision"] == "published"
