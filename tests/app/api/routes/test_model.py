"""GET /model, /model/versions, POST /model/checkpoint and /model/rollback; restart resumes the version."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

from ssd_core.storage.checkpoint import CheckpointStore
from tests.app.conftest import assert_error, labelled, make_settings, start_client


def train(client, shapes, steps: int = 2) -> dict:
    job = client.post("/finetune?wait=true", json={"images": labelled(shapes), "steps": steps})
    assert job.json()["status"] == "succeeded", job.text
    return job.json()


def test_model_info(client):
    info = client.get("/model").json()
    assert info == {
        "architecture": "ssd-small", "num_classes": 4, "priors": "scaled", "class_names": ["rectangle", "ellipse", "triangle"],
        "input_size": 256, "num_priors": client.app.state.host.priors.shape[0], "version": 0, "training_steps": 0,
        "device": "cpu", "backend": "torch", "role": "all", "restored_from": None,
    }
    assert client.registry.get_sample_value(
        "ssd_model_info", {"architecture": "ssd-small", "num_classes": "4", "device": "cpu", "backend": "torch"}) == 1


def test_checkpoint_and_versions(client, shapes):
    assert [v["version"] for v in client.get("/model/versions").json()["versions"]] == [0]  # initial weights
    saved = client.post("/model/checkpoint").json()
    assert saved["version"] == 0 and saved["saved"] and not saved["written"]  # already on disk
    train(client, shapes, steps=3)  # the job's end writes version 3
    again = client.post("/model/checkpoint").json()
    assert again["version"] == 3 and again["step"] == 3 and again["saved"] and not again["written"]
    versions = client.get("/model/versions").json()
    assert versions["current"] == 3
    assert [(v["version"], v["step"]) for v in versions["versions"]] == [(0, 0), (3, 3)]
    assert CheckpointStore(client.app.state.settings.checkpoint_dir).load(3).meta["priors"] == "scaled"


def test_rollback_publishes_old_weights_as_a_new_version(client, shapes):
    items = labelled(shapes)
    original = client.post("/score-loss", json={"images": items}).json()["loss"]
    train(client, shapes, steps=2)
    trained = client.post("/score-loss", json={"images": items}).json()["loss"]
    assert trained != pytest.approx(original)
    response = client.post("/model/rollback", json={"version": 0})
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["version"] == 3 and info["restored_from"] == 0 and info["training_steps"] == 0
    restored = client.post("/score-loss", json={"images": items}).json()
    assert restored["model_version"] == 3
    assert restored["loss"] == pytest.approx(original, rel=1e-6)
    assert [v["version"] for v in client.get("/model/versions").json()["versions"]] == [0, 2, 3]
    # training continues from the restored weights
    assert train(client, shapes, steps=1)["model_version"] == 4


def test_rollback_errors(client):
    assert_error(client.post("/model/rollback", json={"version": 42}), 404, "version", "not_found")
    assert_error(client.post("/model/rollback", json={"version": -1}), 422, "version")
    assert_error(client.post("/model/rollback", json={}), 422, "version")
    assert_error(client.post("/model/rollback", content=b"{", headers={"Content-Type": "application/json"}), 400,
                 "body", "invalid_json")
    assert client.version == 0


def test_restart_resumes_the_newest_checkpoint(tmp_path, shapes):
    settings = make_settings(tmp_path)
    with start_client(settings) as client:
        train(client, shapes, steps=2)
        loss = client.post("/score-loss", json={"images": labelled(shapes)}).json()["loss"]
    with start_client(settings) as client:
        info = client.get("/model").json()
        assert (info["version"], info["training_steps"]) == (2, 2)
        assert client.post("/score-loss", json={"images": labelled(shapes)}).json()["loss"] == pytest.approx(loss)
        assert train(client, shapes, steps=1)["model_version"] == 3


def test_restart_skips_a_corrupt_newest_checkpoint(tmp_path, shapes):
    settings = make_settings(tmp_path)
    with start_client(settings) as client:
        train(client, shapes, steps=2)
    newest = settings.checkpoint_dir / "ckpt-00000002.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with start_client(settings) as client:
        assert client.version == 0


def test_versions_lists_only_checkpoints_that_verify(client, shapes):
    """A torn copy (complete sidecar, half the weights) or a flipped byte is not listed, nor a rollback target."""
    train(client, shapes, steps=1)
    directory = client.app.state.settings.checkpoint_dir
    for version, damage in ((7, lambda data: data[: len(data) // 2]), (8, lambda data: data[:-1] + b"\x00")):
        for suffix in (".safetensors", ".optim.safetensors", ".json"):
            shutil.copyfile(directory / f"ckpt-00000001{suffix}", directory / f"ckpt-{version:08d}{suffix}")
        sidecar = directory / f"ckpt-{version:08d}.json"
        sidecar.write_text(sidecar.read_text().replace('"version": 1', f'"version": {version}').replace(
            "ckpt-00000001", f"ckpt-{version:08d}"))
        weights = directory / f"ckpt-{version:08d}.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
    assert [v["version"] for v in client.get("/model/versions").json()["versions"]] == [0, 1]
    assert_error(client.post("/model/rollback", json={"version": 7}), 404, "version", "not_found")
    assert client.version == 1


def test_failed_checkpoint_write_is_reported_and_the_model_keeps_serving(tmp_path, shapes, monkeypatch):
    """The checkpoint files cannot be written (the small version mark still can): the job's steps are
    served, its checkpoint reports the failure, `POST /model/checkpoint` is a 503."""
    settings = make_settings(tmp_path)
    with start_client(settings) as client:
        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(settings.checkpoint_dir / "ckpt-00000001.json"))

        monkeypatch.setattr(client.app.state.store, "save", full_disk)
        job = train(client, shapes, steps=1)  # the job succeeds; its checkpoint fails quietly
        assert job["status"] == "succeeded" and not job["checkpoint"]["saved"] and job["checkpoint"]["error"]
        assert str(tmp_path) not in job["checkpoint"]["error"]
        assert client.sample("ssd_checkpoints_total", outcome="failed") == 1
        failed = assert_error(client.post("/model/checkpoint"), 503, None, "checkpoint_failed")
        assert "Error" in failed["message"] and str(tmp_path) not in failed["message"]  # no server paths
        assert client.sample("ssd_checkpoints_total", outcome="failed") == 2
        assert client.post("/detect", json={"images": [{"image": labelled(shapes)[0]["image"]}]}).status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.version == 1


def test_a_directory_that_takes_no_write_publishes_no_version(tmp_path, shapes):
    """No version number can be put on disk: the job fails before its first step naming the error (a
    number that is not durable could be handed out again after a crash), the served model is unchanged
    and keeps serving."""
    settings = make_settings(tmp_path)
    with start_client(settings) as client:
        served = {k: v.clone() for k, v in client.app.state.host.current.model.state_dict().items()}
        shutil.rmtree(settings.checkpoint_dir)
        settings.checkpoint_dir.write_text("not a directory")  # every write into it now fails
        job = client.post("/finetune?wait=true", json={"images": labelled(shapes), "steps": 1}).json()
        assert job["status"] == "failed" and "NotADirectoryError" in job["error"], job
        assert str(tmp_path) not in job["error"] and job["steps_done"] == 0 and job["model_version"] is None
        assert client.version == 0 and client.sample("ssd_finetune_steps_total") == 0
        current = client.app.state.host.current.model.state_dict()
        assert all(torch.equal(served[k], v) for k, v in current.items())
        assert client.post("/detect", json={"images": [{"image": labelled(shapes)[0]["image"]}]}).status_code == 200
        assert client.get("/readyz").status_code == 200


def test_without_checkpoint_dir(tmp_path, shapes):
    with start_client(make_settings(tmp_path, checkpoint_dir=None)) as client:
        assert client.get("/model/versions").json() == {"current": 0, "versions": [], "lost": []}
        assert_error(client.post("/model/checkpoint"), 409, None, "no_checkpoint_dir")
        assert train(client, shapes, steps=1)["model_version"] == 1


def test_rollback_to_a_pruned_version_lists_the_saved_ones_and_names_no_path(tmp_path, shapes):
    settings = make_settings(tmp_path, checkpoint_keep=1)
    with start_client(settings) as client:
        train(client, shapes, steps=1)  # version 1 written, version 0 pruned
        assert [v["version"] for v in client.get("/model/versions").json()["versions"]] == [1]
        error = assert_error(client.post("/model/rollback", json={"version": 0}), 404, "version", "not_found")
        assert error["message"] == "version 0 is not saved; the saved versions are [1] (GET /model/versions)"
        assert "ckpt-" not in error["message"] and str(settings.checkpoint_dir) not in error["message"]
