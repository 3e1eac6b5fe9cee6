"""Screening and the publish gate (app.online.gatekeeper) in process: a damaged candidate is rejected
(and the trainer restored bitwise), `ungated` below the minimum, screening rejects a shifted batch and
`force` skips it, and the served version's figures are cached per image."""

from __future__ import annotations

import pytest

from ssd_core.data.images import encode_png
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.online.holdout import holdout_rank
from tests.app.conftest import OVERFIT, labelled, start_client
from tests.app.online.conftest import EVERYTHING, assert_bitwise_equal, gated_settings, shifted, trainer_state


def detections(client, items) -> list:
    answer = client.post("/detect", json={"images": [{"image": i["image"]} for i in items], "score_threshold": 0.05})
    assert answer.status_code == 200
    return answer.json()["detections"]


def test_gate_rejects_damaged_weights_restores_the_trainer_bitwise_and_stores_nothing(tmp_path, trained_weights):
    with start_client(gated_settings(tmp_path, weights=trained_weights, holdout_fraction=0.5)) as client:
        clean = labelled(OVERFIT, EVERYTHING)
        assert client.post("/validation", json={"images": clean}).json()["images"] == 4
        first = client.post("/finetune?wait=true", json={"images": clean, "steps": 1, "learning_rate": 1e-4}).json()
        assert first["status"] == "succeeded" and first["evaluation"]["decision"] == "published", first
        assert first["evaluation"]["served"]["map_50"] == pytest.approx(1.0)
        assert first["model_version"] == client.version == 1
        before_state, before_view = trainer_state(client), client.get("/validation").json()
        before_detections = detections(client, clean)
        # a shifted-box job with some images the hash holds out (force: straight to the gate)
        pool = ShapesDataset(40, image_size=64, seed=12, min_objects=1, max_objects=2, min_size=0.3)
        held = [i for i in range(40) if holdout_rank(encode_png(pool[i].image)) < 0.5][:1]
        kept = [i for i in range(40) if holdout_rank(encode_png(pool[i].image)) >= 0.5][:3]
        bad = labelled([shifted(pool[i]) for i in held + kept], range(4))
        job = client.post("/finetune?wait=true", json={"images": bad, "steps": 8, "learning_rate": 0.05,
                                                       "force": True}).json()
        assert job["status"] == "rejected" and job["held_out"] == 1 and job["steps_done"] == 8, job
        evaluation = job["evaluation"]
        assert evaluation["decision"] == "rejected" and evaluation["served"]["version"] == 1
        assert evaluation["candidate"]["map_50"] < evaluation["served"]["map_50"] - evaluation["margin"]
        assert evaluation["delta"] == pytest.approx(evaluation["candidate"]["map_50"] - evaluation["served"]["map_50"])
        assert "below the reference version's" in job["error"] and evaluation["validation_images"] == 4
        assert [step["model_version"] for step in job["losses"]] == [1] * 8  # nothing was published
        assert client.version == 1 and job["model_version"] == 1
        assert detections(client, clean) == before_detections
        assert_bitwise_equal(trainer_state(client), before_state)  # weights, BatchNorm buffers, optimizer
        assert client.get("/validation").json() == before_view  # the held-out image entered no store
        assert client.get("/model/versions").json()["versions"][-1]["version"] == 1  # nothing checkpointed
        assert client.sample("ssd_gate_decisions_total", decision="rejected") == 1
        assert client.sample("ssd_finetune_jobs_total", state="rejected") == 1
        assert client.sample("ssd_validation_map_50") == pytest.approx(1.0)
        assert client.sample("ssd_validation_ap_50", **{"class": "rectangle"}) >= 0
        assert client.sample("ssd_evaluation_seconds_count") == 2
        # the next job trains from the served weights, not the rejected ones
        again = client.post("/finetune?wait=true", json={"images": clean, "steps": 1, "learning_rate": 1e-4}).json()
        assert again["evaluation"]["decision"] == "published" and again["model_version"] == 2


def test_ungated_below_the_minimum_publishes_at_the_end_only(tmp_path):
    with start_client(gated_settings(tmp_path, gate_min_images=10)) as client:
        job = client.post("/finetune?wait=true", json={"images": labelled(OVERFIT, EVERYTHING), "steps": 3}).json()
        assert job["status"] == "succeeded" and job["evaluation"]["decision"] == "ungated", job
        assert "0 validation images, the gate needs 10" in job["evaluation"]["reason"]
        assert job["evaluation"]["served"] is None and job["evaluation"]["candidate"] is None
        assert [step["model_version"] for step in job["losses"]] == [0, 0, 0]  # served while the job ran
        assert job["model_version"] == client.version == 1
        assert client.sample("ssd_gate_decisions_total", decision="ungated") == 1
        assert job["screening"]["passed"] and job["screening"]["median"] is None  # no accepted jobs yet


def test_screening_rejects_a_shifted_batch_and_force_skips_it_but_not_the_gate(tmp_path, trained_weights):
    with start_client(gated_settings(tmp_path, weights=trained_weights)) as client:
        clean = labelled(OVERFIT, EVERYTHING)
        client.post("/validation", json={"images": clean})
        for _ in range(5):
            job = client.post("/finetune?wait=true", json={"images": clean, "steps": 1, "learning_rate": 1e-5}).json()
            assert job["status"] == "succeeded", job
        version = client.version
        bad = labelled([shifted(OVERFIT[i]) for i in EVERYTHING], range(4))
        job = client.post("/finetune?wait=true", json={"images": bad, "steps": 4, "learning_rate": 0.05}).json()
        screening = job["screening"]
        assert job["status"] == "rejected" and job["steps_done"] == 0 and job["evaluation"] is None
        assert not screening["passed"] and screening["jobs"] == 5 and screening["loss"] > screening["threshold"]
        assert "x its median, loss_c" in job["error"] and '"force": true' in job["error"]  # hints: unit tests
        # the figure is what /score-loss says of the same batch
        scored = client.post("/score-loss", json={"images": bad}).json()
        assert scored["loss"] == pytest.approx(screening["loss"], rel=1e-5)
        assert client.sample("ssd_screening_rejections_total") == 1
        forced = client.post("/finetune?wait=true", json={"images": bad, "steps": 4, "learning_rate": 0.05,
                                                          "force": True}).json()
        assert forced["screening"]["forced"] and not forced["screening"]["passed"]
        assert forced["status"] == "rejected" and forced["evaluation"]["decision"] == "rejected"
        assert client.version == version and client.sample("ssd_screening_rejections_total") == 1


def test_the_served_version_is_scored_only_on_images_new_to_the_validation_set(tmp_path, trained_weights, monkeypatch):
    """A grown validation set (new hash) does not re-run the served version on the images it has seen:
    its per-image parts are kept (a published candidate's become the served version's), and the figures
    combined from them equal the version scored on the whole set from scratch."""
    from app.online import gatekeeper
    from ssd_core.online.gate import score_model

    scored: list[int] = []
    real = gatekeeper.per_image_scores
    monkeypatch.setattr(gatekeeper, "per_image_scores", lambda model, samples, *a, **k: scored.append(len(samples))
                        or real(model, samples, *a, **k))
    pool = labelled(ShapesDataset(7, image_size=64, seed=21), range(7))
    job = {"images": labelled(OVERFIT, EVERYTHING), "steps": 1, "learning_rate": 1e-5}
    with start_client(gated_settings(tmp_path, weights=trained_weights)) as client:
        assert client.post("/validation", json={"images": pool[:4]}).json()["images"] == 4
        first = client.post("/finetune?wait=true", json=job).json()
        assert first["evaluation"]["decision"] == "published" and scored == [4, 4]  # served, then the candidate
        assert client.post("/validation", json={"images": pool[4:7]}).json()["images"] == 7
        samples = client.app.state.worker.validation.snapshot()[1]
        expected = score_model(client.app.state.host.current.model, samples, client.app.state.worker.trainer.criterion,
                               num_classes=3)
        second = client.post("/finetune?wait=true", json=job).json()
        assert scored == [4, 4, 3, 7]  # the served version on the 3 new images only, the candidate on all 7
        served = second["evaluation"]["served"]
        assert served["version"] == first["model_version"] and second["evaluation"]["validation_images"] == 7
        assert served["map_50"] == pytest.approx(expected.map_50, abs=1e-6)
        assert served["loss"] == pytest.approx(expected.loss, rel=1e-5)
        # an image sent again with other boxes is a new entry for the cache (and for the set's samples)
        moved = {**pool[0], "boxes": [[1.0, 1.0, 20.0, 20.0]], "labels": [2]}
        assert client.post("/validation", json={"images": [moved]}).json()["images"] == 7
        truths = {tuple(s.boxes.reshape(-1).tolist()) for s in client.app.state.worker.validation.snapshot()[1]}
        assert (1.0, 1.0, 20.0, 20.0) in truths
        client.post("/finetune?wait=true", json=job)
        assert scored[4:] == [1, 7]  # the served version (job 2's candidate) on the re-annotated image only
