"""The publish gate end to end over real HTTP: a real `python -m app` process with the gated default.

Started from weights trained beforehand (the `trained_weights` fixture stands for the warm-up), a job
with shifted boxes ends `rejected` and the served version and its detections stay as they were; the
validation set and the pins survive a SIGTERM restart and a `kill -9`.
"""

from __future__ import annotations

import signal

import httpx

from tests.app.conftest import OVERFIT, labelled
from tests.app.online.conftest import EVERYTHING, shifted
from tests.integration.live import run_service

SETTINGS = {"SSD_GATE_MIN_IMAGES": "4", "SSD_HOLDOUT_FRACTION": "0", "SSD_WARMUP_STEPS": "0",
            "SSD_CHECKPOINT_KEEP": "2", "SSD_SHUTDOWN_TIMEOUT_S": "20",
            "SSD_MAX_LEARNING_RATE": "0.1"}  # the damaging job trains at 0.05, above the default 10 x 1e-3


def _detect(http: httpx.Client, items: list[dict]) -> dict:
    response = http.post("/detect", json={"images": [{"image": i["image"]} for i in items], "score_threshold": 0.05})
    assert response.status_code == 200, response.text
    return response.json()


def _durable_state(http: httpx.Client) -> tuple[dict, list]:
    validation = http.get("/validation").json()
    versions = http.get("/model/versions").json()["versions"]
    return validation, [(v["version"], v["pinned"]) for v in versions]


def test_gated_server_rejects_shifted_boxes_and_keeps_validation_set_and_pins(tmp_path, trained_weights):
    clean = labelled(OVERFIT, EVERYTHING)
    bad = labelled([shifted(OVERFIT[i]) for i in EVERYTHING], range(4))
    env = {**SETTINGS, "SSD_WEIGHTS": str(trained_weights)}
    with run_service(tmp_path, module=True, **env) as service, httpx.Client(base_url=service.url, timeout=120) as http:
        assert http.post("/validation", json={"images": clean}).json()["images"] == 4
        assert http.post("/model/versions/0/pin").json()["pins"] == [0]
        before = _detect(http, clean)
        assert before["model_version"] == 0
        job = http.post("/finetune", params={"wait": "true"},
                        json={"images": bad, "steps": 8, "learning_rate": 0.05, "force": True}).json()
        assert job["status"] == "rejected" and job["evaluation"]["decision"] == "rejected", job
        assert job["evaluation"]["served"]["map_50"] > job["evaluation"]["candidate"]["map_50"]
        assert http.get("/model").json()["version"] == 0
        assert _detect(http, clean) == before  # the served weights are untouched
        for _ in range(3):  # accepted jobs: new versions, 0 pruned but for its pin
            accepted = http.post("/finetune", params={"wait": "true"},
                                 json={"images": clean, "steps": 1, "learning_rate": 1e-5}).json()
            assert accepted["status"] == "succeeded" and accepted["evaluation"]["decision"] == "published", accepted
        state = _durable_state(http)
        assert state[1] == [(0, True), (2, False), (3, False)] and state[0]["images"] == 4
        metrics = http.get("/metrics").text
        assert 'ssd_gate_decisions_total{decision="rejected"} 1.0' in metrics
        assert 'ssd_gate_decisions_total{decision="published"} 3.0' in metrics

    with run_service(tmp_path, module=True, **env) as service, httpx.Client(base_url=service.url, timeout=120) as http:
        assert _durable_state(http) == state  # after SIGTERM
        assert http.get(f"/finetune/{job['job_id']}").json()["status"] == "rejected"  # the journal
        http.post("/model/versions/3/pin")
        state = _durable_state(http)
        service.process.send_signal(signal.SIGKILL)
        service.process.wait(timeout=30)

    with run_service(tmp_path, module=True, **env) as service, httpx.Client(base_url=service.url, timeout=120) as http:
        assert _durable_state(http) == state  # after kill -9
        assert state[1] == [(0, True), (2, False), (3, True)]
        assert http.get("/validation").json()["corrupt_dropped"] == 0
