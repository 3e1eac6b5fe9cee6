"""The checkpoint operations (app.online.checkpoints): pins survive pruning; with an EMA a checkpoint
holds both the served average and the raw weights, and a restart resumes both."""

from __future__ import annotations

import torch

from ssd_core.storage.checkpoint import CheckpointStore
from tests.app.conftest import OVERFIT, assert_error, labelled, make_settings, start_client


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


def test_with_ema_the_served_version_is_the_average_and_a_restart_resumes_both(tmp_path, shapes):
    settings = make_settings(tmp_path, ema_decay=0.9, ema_tau=1.0)
    with start_client(settings) as client:
        done = client.post("/finetune?wait=true", json={"images": labelled(shapes), "steps": 3}).json()
        assert done["status"] == "succeeded" and done["model_version"] == 3
        trainer = client.app.state.worker.trainer
        served = client.app.state.host.current.model.state_dict()
        assert all(torch.equal(served[k], v) for k, v in trainer.weights().items())  # the EMA is served
        raw = {k: v.clone() for k, v in trainer.module.state_dict().items()}
        assert not torch.equal(served["loc.0.weight"], raw["loc.0.weight"])
        ema = {k: v.clone() for k, v in trainer.weights().items()}
    info = CheckpointStore(settings.checkpoint_dir).versions()[-1]
    assert info.version == 3 and info.training_weights is not None
    with start_client(settings) as client:
        trainer = client.app.state.worker.trainer
        assert all(torch.equal(raw[k], v) for k, v in trainer.module.state_dict().items())
        assert all(torch.equal(ema[k], v) for k, v in client.app.state.host.current.model.state_dict().items())
        assert trainer.ema.updates == trainer.steps == 3
