"""Gated publishing in process: the holdout, the validation set routes, screening, the gate and its
bitwise restore, `ungated`, pins, the learning-rate limit and warm-up."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

from ssd_core.data.datasets import Sample
from ssd_core.data.images import encode_png
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.online.holdout import holdout_rank
from ssd_core.storage.sample_store import content_key
from tests.app.conftest import OVERFIT, assert_error, labelled, make_settings, start_client

EVERYTHING = (0, 1, 2, 3)


def gated_settings(tmp_path, **overrides):
    # max_learning_rate: the damaging jobs below train at 0.05, above the default limit (10 x 1e-3)
    values = dict(publish="gated", holdout_fraction=0.0, warmup_steps=0, gate_min_images=4, checkpoint_keep=20,
                  max_learning_rate=0.1)
    return make_settings(tmp_path, **{**values, **overrides})


def shifted(sample: Sample) -> Sample:
    """Boxes moved right and down by half their size (clipped to the image): a coordinate bug upstream."""
    boxes = sample.boxes.clone()
    size = boxes[:, 2:] - boxes[:, :2]
    boxes[:, :2] += size / 2
    boxes[:, 2:] = (boxes[:, 2:] + size / 2).clamp(max=float(sample.image.shape[-1]))
    return Sample(sample.image, boxes, sample.labels, sample.difficult)


def trainer_state(client) -> tuple[dict, dict, int]:
    trainer = client.app.state.worker.trainer
    return copy.deepcopy(trainer.module.state_dict()), copy.deepcopy(trainer.optimizer.state_dict()), trainer.steps


def assert_bitwise_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_bitwise_equal(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_bitwise_equal(x, y)
    else:
        assert a == b


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


def test_holdout_is_stable_under_resending_and_accepted_images_join_the_validation_set(tmp_path):
    pool = ShapesDataset(60, image_size=64, seed=5)
    images = [encode_png(pool[i].image) for i in range(60)]
    held = [i for i in range(60) if holdout_rank(images[i]) < 0.3][:2]
    kept = [i for i in range(60) if holdout_rank(images[i]) >= 0.3][:2]
    with start_client(make_settings(tmp_path, holdout_fraction=0.3)) as client:  # every_step: holdout too
        body = {"images": labelled(pool, held + kept), "steps": 1}
        job = client.post("/finetune?wait=true", json=body).json()
        assert job["status"] == "succeeded" and job["held_out"] == 2
        view = client.get("/validation").json()
        assert {e["key"] for e in view["entries"]} == {content_key(images[i]) for i in held}
        resent = client.post("/finetune?wait=true", json={**body, "images": body["images"][::-1]}).json()
        assert resent["held_out"] == 2
        assert client.get("/validation").json()["hash"] == view["hash"]  # the same two, nothing new
        # a job left with fewer than two training images (BatchNorm) trains on none
        lone = client.post("/finetune?wait=true", json={"images": labelled(pool, held + kept[:1]), "steps": 3}).json()
        assert lone["status"] == "succeeded" and lone["steps_done"] == 0 and lone["held_out"] == 2
        assert lone["model_version"] == client.version
        assert client.sample("ssd_validation_images") == 2


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


def test_validation_routes_json_multipart_view_and_clear(tmp_path):
    with start_client(gated_settings(tmp_path, validation_max_images=3)) as client:
        added = client.post("/validation", json={"images": labelled(OVERFIT, (0, 1))}).json()
        assert added["added"] == 2 and added["images"] == 2 and added["dropped"] == 0
        files = [("images", (f"{i}.png", encode_png(OVERFIT[i].image), "image/png")) for i in (2, 3)]
        notes = [{"boxes": OVERFIT[i].boxes.tolist(), "labels": OVERFIT[i].labels.tolist()} for i in (2, 3)]
        response = client.post("/validation", files=files, data={"annotations": json.dumps(notes)})
        assert response.status_code == 200, response.text
        assert response.json()["images"] == 3  # bounded: reservoir sampling past 3
        view = client.get("/validation").json()
        assert view["images"] == 3 and view["max_images"] == 3 and len(view["entries"]) == 3
        counts = {}
        for i in EVERYTHING:
            if content_key(encode_png(OVERFIT[i].image)) in {e["key"] for e in view["entries"]}:
                for label in OVERFIT[i].labels.tolist():
                    name = ["rectangle", "ellipse", "triangle"][label]
                    counts[name] = counts.get(name, 0) + 1
        assert view["boxes"] == counts and view["bytes"] == sum(e["bytes"] for e in view["entries"])
        assert_error(client.post("/validation", json={"images": [{**labelled(OVERFIT, (0,))[0], "labels": [7]}]}),
                     422, "images[0].labels[0]")
        cleared = client.delete("/validation").json()
        assert cleared["images"] == 0 and client.sample("ssd_validation_images") == 0


def test_corrupt_validation_entries_are_dropped_and_counted_at_restart(tmp_path):
    settings = gated_settings(tmp_path)
    with start_client(settings) as client:
        client.post("/validation", json={"images": labelled(OVERFIT, EVERYTHING)})
    entries = sorted((settings.checkpoint_dir / "validation").glob("*.sample"))
    entries[0].write_bytes(entries[0].read_bytes()[:-10])  # torn
    with start_client(settings) as client:
        view = client.get("/validation").json()
        assert view["images"] == 3 and view["corrupt_dropped"] == 1
        assert client.get("/readyz").status_code == 200


def test_pinned_versions_survive_pruning_and_are_listed(tmp_path):
    with start_client(make_settings(tmp_path, checkpoint_keep=2)) as client:
        pinned = client.post("/model/versions/0/pin").json()
        assert pinned == {"version": 0, "pinned": True, "pins": [0]}
        for _ in range(3):
            client.post("/finetune?wait=true", json={"images": labelled(OVERFIT), "steps": 1})
        versions = client.get("/model/versions").json()["versions"]
        assert [(v["version"], v["pinned"]) for v in versions] == [(0, True), (2, False), (3, False)]
        assert client.post("/model/rollback", json={"version": 0}).status_code == 200
        assert client.delete("/model/versions/0/pin").json() == {"version": 0, "pinned": False, "pins": []}
        assert_error(client.delete("/model/versions/0/pin"), 404, "version", "not_found")
        assert_error(client.post("/model/versions/1/pin"), 404, "version", "not_found")  # pruned long ago
        client.post("/finetune?wait=true", json={"images": labelled(OVERFIT), "steps": 1})
        assert 0 not in [v["version"] for v in client.get("/model/versions").json()["versions"]]


def test_learning_rate_above_the_maximum_is_a_422_and_warm_up_scales_a_fresh_model(tmp_path):
    with start_client(make_settings(tmp_path, max_learning_rate=0.05, warmup_steps=4, clip_grad_norm=5.0)) as client:
        assert_error(client.post("/finetune", json={"images": labelled(OVERFIT), "learning_rate": 0.06}), 422,
                     "learning_rate")
        job = client.post("/finetune?wait=true", json={"images": labelled(OVERFIT), "steps": 5,
                                                       "learning_rate": 0.04}).json()
        assert [step["learning_rate"] for step in job["losses"]] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.04])
        assert client.app.state.worker.trainer.config.clip_grad_norm == 5.0
    with pytest.raises(ValueError, match="exceeds max_learning_rate"):
        make_settings(tmp_path, learning_rate=0.2, max_learning_rate=0.1)


def test_the_default_learning_rate_limit_is_ten_times_the_recipes_rate(tmp_path):
    assert make_settings(tmp_path).learning_rate_limit() == pytest.approx(0.01)  # AdamW 1e-3
    assert make_settings(tmp_path, optimizer="sgd", learning_rate=0.005).learning_rate_limit() == pytest.approx(0.05)
    with start_client(make_settings(tmp_path)) as client:
        refused = client.post("/finetune", json={"images": labelled(OVERFIT), "learning_rate": 0.011})
        assert "10 x SSD_LEARNING_RATE" in assert_error(refused, 422, "learning_rate")["message"]
        job = client.post("/finetune?wait=true", json={"images": labelled(OVERFIT), "learning_rate": 0.01}).json()
        assert job["status"] == "succeeded" and job["learning_rate"] == 0.01


def test_publish_every_steps_judges_within_a_job(tmp_path, trained_weights):
    with start_client(gated_settings(tmp_path, weights=trained_weights, publish_every_steps=2)) as client:
        client.post("/validation", json={"images": labelled(OVERFIT, EVERYTHING)})
        job = client.post("/finetune?wait=true", json={"images": labelled(OVERFIT, EVERYTHING), "steps": 4,
                                                       "learning_rate": 1e-5}).json()
        assert job["status"] == "succeeded" and job["evaluation"]["decision"] == "published", job
        assert [step["model_version"] for step in job["losses"]] == [0, 0, 1, 1]  # published after step 2
        assert job["model_version"] == client.version == 2
        assert client.sample("ssd_gate_decisions_total", decision="published") == 2


def test_a_cancelled_gated_job_publishes_nothing_and_restores_the_trainer(tmp_path):
    with start_client(gated_settings(tmp_path)) as client:
        before = trainer_state(client)
        job = client.post("/finetune", json={"images": labelled(OVERFIT, EVERYTHING), "steps": 200}).json()
        while client.get(f"/finetune/{job['job_id']}").json()["steps_done"] < 2:
            time.sleep(0.02)
        client.delete(f"/finetune/{job['job_id']}")
        done = client.app.state.worker.get(job["job_id"]).finished.result(timeout=60)
        assert done is None
        view = client.get(f"/finetune/{job['job_id']}").json()
        assert view["status"] == "cancelled" and view["steps_done"] >= 2 and view["evaluation"] is None
        assert client.version == 0
        assert_bitwise_equal(trainer_state(client), before)


def test_the_served_version_is_scored_only_on_images_new_to_the_validation_set(tmp_path, trained_weights, monkeypatch):
    """A grown validation set (new hash) does not re-run the served version on the images it has seen:
    its per-image parts are kept (a published candidate's become the served version's), and the figures
    combined from them equal the version scored on the whole set from scratch."""
    from app import publishing
    from ssd_core.online.gate import score_model

    scored: list[int] = []
    real = publishing.score_images
    monkeypatch.setattr(publishing, "score_images", lambda model, samples, *a, **k: scored.append(len(samples))
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
