"""Training one job (app.online.job_training): steps publish versions (every_step) or go through the gate
(within a job too), skipped steps, the holdout, warm-up, per-class figures, and the bitwise restore of
a cancelled or rejected gated job."""

from __future__ import annotations

import copy
import logging
import time

import pytest
import torch
from safetensors.torch import save_file

import app.online.gatekeeper
from ssd_core.data.images import encode_png
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.models import build_model
from ssd_core.online.gate import GateDecision
from ssd_core.online.holdout import holdout_rank
from ssd_core.storage.sample_store import content_key
from tests.app.conftest import OVERFIT, CriterionSpy, assert_error, labelled, make_settings, start_client
from tests.app.online.conftest import EVERYTHING, assert_bitwise_equal, gated_settings, trainer_state


def test_finetune_lowers_the_batch_loss_and_publishes_versions(client, shapes):
    torch.manual_seed(0)
    items = labelled(shapes)
    before = client.post("/score-loss", json={"images": items}).json()
    assert before["model_version"] == 0
    response = client.post("/finetune?wait=true", json={"images": items, "steps": 40, "learning_rate": 0.005})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded"
    assert job["steps_done"] == job["steps_total"] == 40
    assert [step["model_version"] for step in job["losses"]] == list(range(1, 41))  # one version per step
    assert job["model_version"] == 40
    after = client.post("/score-loss", json={"images": items}).json()
    assert after["model_version"] == 40
    assert after["loss"] < 0.5 * before["loss"]
    assert client.get("/model").json()["training_steps"] == 40
    assert client.sample("ssd_finetune_steps_total") == 40
    assert client.sample("ssd_model_version") == 40
    assert client.sample("ssd_finetune_jobs_total", state="succeeded") == 1
    assert client.sample("ssd_loss_conf_count", source="finetune") == 40
    assert client.sample("ssd_learning_rate") == pytest.approx(0.005)
    assert client.sample("ssd_images_processed_total", route="/finetune") == 80
    assert client.sample("ssd_checkpoints_total", outcome="saved") == 2  # the initial weights, then the job


def test_skipped_non_finite_steps(tmp_path, shapes):
    with start_client(make_settings(tmp_path, max_learning_rate=1e13)) as client:
        _check_skipped_steps(client, shapes)


def _check_skipped_steps(client, shapes):
    job = client.post("/finetune?wait=true", json={"images": labelled(shapes), "steps": 3,
                                                   "learning_rate": 1e12}).json()
    assert job["skipped_steps"] >= 1
    version = 0
    for step in job["losses"]:  # a completed step publishes the next version, a skipped one nothing
        version += 0 if step["skipped"] else 1
        assert step["model_version"] == version
    assert client.version == version
    assert client.sample("ssd_finetune_skipped_steps_total") == job["skipped_steps"]


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
        # one image left to train on (BatchNorm needs two per step): the replay memory fills the batch
        lone = client.post("/finetune?wait=true", json={"images": labelled(pool, held + kept[:1]), "steps": 3}).json()
        assert lone["status"] == "succeeded" and lone["steps_done"] == 3 and lone["held_out"] == 2, lone
        assert all(step["replayed"] >= 1 for step in lone["losses"])
        # without replay the holdout gives back an image not yet validating: the job trains
        fresh = [i for i in range(60) if holdout_rank(images[i]) < 0.3][2]
        alone = client.post("/finetune?wait=true", json={"images": labelled(pool, [fresh, kept[0]]), "steps": 3,
                                                         "replay": 0}).json()
        assert alone["status"] == "succeeded" and alone["steps_done"] == 3 and alone["held_out"] == 0, alone
        assert alone["model_version"] == client.version
        # ... but never a validation image: then the job cannot train and says why, never `succeeded` with 0 steps
        short = client.post("/finetune?wait=true", json={"images": labelled(pool, held + kept[:1]), "steps": 3,
                                                         "replay": 0}).json()
        assert short["status"] == "rejected" and short["steps_done"] == 0, short
        assert "nothing trained: 1 of the job's images left to train on (0 quarantined, 2 held out" in short["error"]
        assert client.sample("ssd_validation_images") == 2


def test_learning_rate_above_the_maximum_is_a_422_and_warm_up_scales_a_fresh_model(tmp_path):
    with start_client(make_settings(tmp_path, max_learning_rate=0.05, warmup_steps=4, clip_grad_norm=5.0)) as client:
        assert_error(client.post("/finetune", json={"images": labelled(OVERFIT), "learning_rate": 0.06}), 422,
                     "learning_rate")
        job = client.post("/finetune?wait=true", json={"images": labelled(OVERFIT), "steps": 5,
                                                       "learning_rate": 0.04}).json()
        assert [step["learning_rate"] for step in job["losses"]] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.04])
        assert job["warmup"] == (  # the view says so: steps 1-4 ran below the job's rate
            "the warm-up of a fresh optimizer lowered the learning rate of steps 1-4 to 0.01..0.04 (of 0.04): the "
            "trainer has taken 0 of SSD_WARMUP_STEPS=4 steps; it ends by itself as jobs train (send more steps to end "
            "it sooner)")
        again = client.post("/finetune?wait=true", json={"images": labelled(OVERFIT), "steps": 2}).json()
        assert again["warmup"] is None  # past the warm-up
        assert client.app.state.worker.trainer.config.clip_grad_norm == 5.0
    with pytest.raises(ValueError, match="exceeds max_learning_rate"):
        make_settings(tmp_path, learning_rate=0.2, max_learning_rate=0.1)


def test_trained_weights_warm_up_too_and_jobs_log_their_start_and_end(tmp_path, caplog):
    weights = tmp_path / "trained.safetensors"
    save_file(build_model("ssd-small", 4).state_dict(), weights)
    with start_client(make_settings(tmp_path, weights=weights, warmup_steps=4)) as client, \
            caplog.at_level(logging.INFO, logger="app.online.worker"):
        job = client.post("/finetune?wait=true", json={"images": labelled(OVERFIT), "steps": 2}).json()
    assert job["warmup"] is not None  # a fresh optimizer on trained weights ramps up as on random ones
    assert [step["learning_rate"] for step in job["losses"]] == pytest.approx([2.5e-4, 5e-4])
    lines = [r.getMessage() for r in caplog.records if r.name == "app.online.worker"]
    loss = job["losses"][-1]["loss_l"] + job["losses"][-1]["loss_c"]
    assert lines == [
        f"fine-tune job {job['job_id']} started: 2 images, 2 steps, learning rate 0.001 (SSD_LEARNING_RATE)",
        f"fine-tune job {job['job_id']} succeeded; 2/2 steps (0 skipped), last loss {loss:.3f}, gate not judged, "
        f"model version {job['model_version']}",
    ]


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


def test_a_rejected_job_puts_the_ema_and_the_raw_weights_back_bitwise(tmp_path, shapes, monkeypatch):
    settings = make_settings(tmp_path, publish="gated", gate_min_images=1, ema_decay=0.9, ema_tau=1.0)
    with start_client(settings) as client:
        assert client.post("/validation", json={"images": labelled(shapes, (6, 7))}).status_code == 200
        monkeypatch.setattr(app.online.gatekeeper, "decide", lambda *args: GateDecision("published"))
        assert client.post("/finetune?wait=true", json={"images": labelled(shapes), "steps": 2}).json()[
            "status"] == "succeeded"
        trainer = client.app.state.worker.trainer
        ema, raw = copy.deepcopy(trainer.weights()), copy.deepcopy(trainer.module.state_dict())
        monkeypatch.setattr(app.online.gatekeeper, "decide", lambda *args: GateDecision("rejected", reason="forced"))
        job = client.post("/finetune?wait=true", json={"images": labelled(shapes, (2, 3)), "steps": 2}).json()
        assert job["status"] == "rejected" and job["steps_done"] == 2, job
        assert all(torch.equal(ema[k], v) for k, v in trainer.weights().items())
        assert all(torch.equal(raw[k], v) for k, v in trainer.module.state_dict().items())
        assert trainer.ema.updates == trainer.steps == 2
        served = client.app.state.host.current.model.state_dict()
        assert all(torch.equal(ema[k], v) for k, v in served.items())  # the EMA was what the gate published


def test_job_view_pools_per_class_statistics_over_its_steps(client, shapes):
    spy = CriterionSpy.install(client)
    response = client.post("/finetune?wait=true", json={"images": labelled(shapes, (0, 1, 2)), "steps": 3})
    assert response.status_code == 200, response.text
    job = response.json()
    assert len(spy.training_outputs) == 3
    per_class = [output.stats.per_class for output in spy.training_outputs]
    pooled = per_class[0] + per_class[1] + per_class[2]
    names = ["rectangle", "ellipse", "triangle"]
    assert [row["class_name"] for row in job["per_class"]] == names
    for got, want in zip(job["per_class"], pooled.rows(names), strict=True):
        assert got == {key: value if key == "class_name" else pytest.approx(value, rel=1e-5, abs=1e-7)
                       for key, value in want.items()}
    truths = sum(len(shapes[i].boxes) for i in (0, 1, 2))
    assert sum(row["num_ground_truth"] for row in job["per_class"]) == 3 * truths
    assert client.get(f"/finetune/{job['job_id']}").json()["per_class"] == job["per_class"]
