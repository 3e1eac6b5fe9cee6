"""Screening and the publish gate (app.online.gatekeeper) in process: a damaged candidate is rejected
(and the trainer restored bitwise), `ungated` below the minimum, screening rejects a shifted batch from
the first job and `force` skips it, a quarantined image enters no store, a small job trains or says why,
the served and reference versions' figures are kept per image and the reference survives the set's growth."""

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
    # screening that quarantines nothing (a quarantined image is never held out): the gate is what is tested
    settings = gated_settings(tmp_path, weights=trained_weights, holdout_fraction=0.5, screen_ratio=1e9)
    with start_client(settings) as client:
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
        screening = job["screening"]
        assert screening["passed"] and not screening["losses_checked"] and screening["quarantined"] == 0
        assert "not yet competent" in screening["quiet_reason"]  # nothing to compare with yet


def test_screening_rejects_a_shifted_batch_and_force_skips_it_but_not_the_gate(tmp_path, trained_weights):
    """From the first job: no accepted jobs are needed, the served model's losses on the validation set now
    are the baseline."""
    with start_client(gated_settings(tmp_path, weights=trained_weights)) as client:
        clean = labelled(OVERFIT, EVERYTHING)
        client.post("/validation", json={"images": clean})
        version = client.version
        bad = labelled([shifted(OVERFIT[i]) for i in EVERYTHING], range(4))
        job = client.post("/finetune?wait=true", json={"images": bad, "steps": 4, "learning_rate": 0.05}).json()
        screening = job["screening"]
        assert job["status"] == "rejected" and job["steps_done"] == 0 and job["evaluation"] is None, job
        assert screening["losses_checked"] and not screening["passed"] and screening["quarantined"] == 4
        for image in screening["images"]:
            issue = image["issues"][0]
            assert image["quarantined"] and issue["issue"] == "loc_loss" and issue["value"] > issue["threshold"]
        assert "three quarters of the job's 4 images have a served-model loss_l per matched prior" in job["error"]
        assert "boxes in the wrong place" in job["error"]
        assert '"force": true' in job["error"]
        # the batch figure is what /score-loss says of the same batch
        scored = client.post("/score-loss", json={"images": bad}).json()
        assert scored["loss"] == pytest.approx(screening["loss"], rel=1e-5)
        assert client.sample("ssd_screening_rejections_total") == 1
        assert client.sample("ssd_quarantined_images_total") == 4
        forced = client.post("/finetune?wait=true", json={"images": bad, "steps": 4, "learning_rate": 0.05,
                                                          "force": True}).json()
        assert forced["screening"]["forced"] and not forced["screening"]["passed"] and forced["steps_done"] == 4
        assert forced["status"] == "rejected" and forced["evaluation"]["decision"] == "rejected"
        assert client.version == version and client.sample("ssd_screening_rejections_total") == 1


def test_a_quarantined_image_is_not_trained_on_and_enters_no_store(tmp_path, trained_weights):
    """One shifted image among clean ones: quarantined (listed in the job view), the job trains on the others;
    the image would be held out by its hash, yet the validation set and the replay memory never see it."""
    with start_client(gated_settings(tmp_path, weights=trained_weights, holdout_fraction=0.9)) as client:
        client.post("/validation", json={"images": labelled(OVERFIT, EVERYTHING)})
        before = client.get("/validation").json()
        assert holdout_rank(encode_png(OVERFIT[3].image)) < 0.9 <= holdout_rank(encode_png(OVERFIT[1].image))
        images = labelled(OVERFIT, (1, 2)) + labelled([shifted(OVERFIT[3])], [0])
        job = client.post("/finetune?wait=true", json={"images": images, "steps": 2, "learning_rate": 1e-5}).json()
        assert job["status"] == "succeeded" and job["steps_done"] == 2 and job["held_out"] == 0, job
        listed = job["screening"]["images"]
        assert job["screening"]["quarantined"] == 1 and [i["image"] for i in listed if i["quarantined"]] == [2]
        assert client.get("/validation").json() == before  # the held-out (by hash) shifted image did not join
        assert client.sample("ssd_replay_images") == 2  # the two clean images only
        # one image quarantined, one a validation image the holdout keeps, no replay: it says why it cannot train
        few = labelled(OVERFIT, (0, 1)) + labelled([shifted(OVERFIT[3])], [0])
        no_replay = client.post("/finetune?wait=true", json={"images": few, "steps": 1, "replay": 0}).json()
        assert no_replay["status"] == "rejected" and no_replay["steps_done"] == 0, no_replay
        assert ("nothing trained: 1 of the job's images left to train on (1 quarantined, 1 held out"
                in no_replay["error"])
        # with the replay memory filling the batch, the same job trains
        replayed = client.post("/finetune?wait=true", json={"images": few, "steps": 1, "learning_rate": 1e-5}).json()
        assert replayed["status"] == "succeeded" and replayed["losses"][0]["replayed"] >= 1, replayed


def test_a_two_image_job_with_one_held_out_trains_on_both(tmp_path):
    """A fresh BatchNorm model, no replay yet: the holdout gives its image back rather than train on nothing."""
    pool = ShapesDataset(40, image_size=64, seed=12)
    held = next(i for i in range(40) if holdout_rank(encode_png(pool[i].image)) < 0.5)
    kept = next(i for i in range(40) if holdout_rank(encode_png(pool[i].image)) >= 0.5)
    with start_client(gated_settings(tmp_path, holdout_fraction=0.5)) as client:
        job = client.post("/finetune?wait=true", json={"images": labelled(pool, (held, kept)), "steps": 2}).json()
        assert job["status"] == "succeeded" and job["steps_done"] == 2 and job["held_out"] == 0, job
        assert client.get("/validation").json()["images"] == 0


def test_the_served_version_is_scored_only_on_images_new_to_the_validation_set(tmp_path, trained_weights, monkeypatch):
    """A grown validation set (new hash) does not re-run the served version on the images it has seen:
    its per-image parts are kept (a published candidate's become the served version's), and the figures
    combined from them equal the version scored on the whole set from scratch."""
    from app.online import gatekeeper
    from ssd_core.online.gate import score_model

    calls: list[tuple[bool, int]] = []  # (the trainer's candidate?, images) of every per-image scoring
    real = gatekeeper.per_image_scores
    pool = labelled(ShapesDataset(7, image_size=64, seed=21), range(7))
    job = {"images": labelled(OVERFIT, EVERYTHING), "steps": 1, "learning_rate": 1e-5}
    with start_client(gated_settings(tmp_path, weights=trained_weights)) as client:
        trainer = client.app.state.worker.trainer
        monkeypatch.setattr(gatekeeper, "per_image_scores", lambda model, samples, *a, **k: calls.append(
            (model is trainer.published, len(samples))) or real(model, samples, *a, **k))
        assert client.post("/validation", json={"images": pool[:4]}).json()["images"] == 4
        first = client.post("/finetune?wait=true", json=job).json()
        assert first["evaluation"]["decision"] == "published"
        assert calls == [(False, 4), (False, 4), (True, 4)]  # the job's images, the served version, the candidate
        assert client.post("/validation", json={"images": pool[4:7]}).json()["images"] == 7
        samples = client.app.state.worker.validation.snapshot()[1]
        expected = score_model(client.app.state.host.current.model, samples, trainer.criterion, num_classes=3)
        del calls[:]
        second = client.post("/finetune?wait=true", json=job).json()
        assert (True, 7) in calls and (False, 7) not in calls and (False, 3) in calls, calls  # new images only
        served = second["evaluation"]["served"]
        assert served["version"] == first["model_version"] and second["evaluation"]["validation_images"] == 7
        assert served["map_50"] == pytest.approx(expected.map_50, abs=1e-6)
        assert served["loss"] == pytest.approx(expected.loss, rel=1e-5)
        # an image sent again with other boxes is a new entry for the cache (and for the set's samples)
        moved = {**pool[0], "boxes": [[1.0, 1.0, 20.0, 20.0]], "labels": [2]}
        assert client.post("/validation", json={"images": [moved]}).json()["images"] == 7
        truths = {tuple(s.boxes.reshape(-1).tolist()) for s in client.app.state.worker.validation.snapshot()[1]}
        assert (1.0, 1.0, 20.0, 20.0) in truths
        del calls[:]
        client.post("/finetune?wait=true", json=job)
        assert (False, 1) in calls and (False, 7) not in calls, calls  # the re-annotated image only


def test_the_reference_survives_the_validation_sets_growth(tmp_path, trained_weights, monkeypatch):
    """A worse candidate published within the margin does not become the reference; after the set grows, the
    next candidate is still judged against the line's best, scored on the new images too."""
    import copy

    from ssd_core.online.gate import score_model

    settings = gated_settings(tmp_path, weights=trained_weights, gate_tolerance=1.0, gate_loss_tolerance=1e9,
                              gate_detection_tolerance=1e9)  # anything publishes: the line is what is tested
    tiny = {"images": labelled(OVERFIT, EVERYTHING), "steps": 1, "learning_rate": 1e-5}
    with start_client(settings) as client:
        client.post("/validation", json={"images": labelled(OVERFIT, EVERYTHING)})
        first = client.post("/finetune?wait=true", json=tiny).json()
        assert first["evaluation"]["decision"] == "published" and first["model_version"] == 1
        best = copy.deepcopy(client.app.state.host.current.model)
        bad = labelled([shifted(OVERFIT[i]) for i in EVERYTHING], range(4))
        worse = client.post("/finetune?wait=true", json={"images": bad, "steps": 8, "learning_rate": 0.05,
                                                         "force": True}).json()
        assert worse["evaluation"]["decision"] == "published" and worse["evaluation"]["delta"] < 0, worse
        assert worse["model_version"] == 2 and worse["evaluation"]["reference_version"] == 1
        grown = labelled(ShapesDataset(3, image_size=64, seed=21), range(3))
        assert client.post("/validation", json={"images": grown}).json()["images"] == 7
        third = client.post("/finetune?wait=true", json=tiny).json()["evaluation"]
        assert third["served"]["version"] == 2 and third["reference_version"] == 1, third
        samples = client.app.state.worker.validation.snapshot()[1]
        reference = score_model(best, samples, client.app.state.worker.trainer.criterion, num_classes=3)
        assert third["delta"] == pytest.approx(third["candidate"]["map_50"] - reference.map_50, abs=1e-6)
