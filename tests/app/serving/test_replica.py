"""app.serving.replica in-process: server replicas follow the trainer's checkpoint directory, refuse trainer routes,
never load a half-written or corrupt checkpoint, and metrics merge across worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from app.core.metrics import MULTIPROC_ENV, prepare_multiprocess_dir
from app.core.settings import Settings
from ssd_core.models import build_model
from ssd_core.storage.checkpoint import CheckpointStore
from tests.app.conftest import assert_error, labelled, make_settings, start_client

STILL = 3600.0  # reload interval of tests that call poll() themselves: the watcher thread never fires


def save_checkpoint(directory, version: int, seed: int, **meta) -> dict[str, torch.Tensor]:
    """Write ssd-small weights drawn from `seed` as checkpoint `version`, as the trainer would; returns them."""
    torch.manual_seed(seed)
    state = build_model("ssd-small", 4).state_dict()
    CheckpointStore(directory).save(state, {"version": version, "step": 10 * version, "model": "ssd-small",
                                            "num_classes": 4, **meta})
    return state


def served_weights(client) -> dict[str, torch.Tensor]:
    return client.app.state.host.current.model.state_dict()


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name].cpu(), tensor.cpu()), name


def test_server_refuses_trainer_routes_and_serves_inference(tmp_path, shapes):
    save_checkpoint(tmp_path / "checkpoints", 3, seed=1)
    in_flight = tmp_path / "checkpoints" / ".tmp-ckpt-ckpt-00000004.safetensors.abc123"  # the trainer's write
    in_flight.write_bytes(b"partial")
    with start_client(make_settings(tmp_path, role="server", reload_interval=STILL)) as server:
        images = labelled(shapes)
        refused = [
            server.post("/finetune", json={"images": images}), server.post("/finetune?wait=true", json={"images": images}),
            server.get("/finetune/abc"), server.delete("/finetune/abc"),
            server.post("/model/checkpoint"), server.post("/model/rollback", json={"version": 3}),
        ]
        for response in refused:
            error = assert_error(response, 409, None, "wrong_role")
            assert "SSD_ROLE=server" in error["message"]
        assert server.post("/detect", json={"images": [{"image": images[0]["image"]}]}).json()["model_version"] == 3
        assert server.post("/score-loss", json={"images": images}).json()["model_version"] == 3
        model = server.get("/model").json()
        assert (model["version"], model["training_steps"], model["role"]) == (3, 30, "server")
        assert server.get("/model/versions").json()["current"] == 3
        assert server.get("/readyz").status_code == 200
        assert in_flight.exists()  # a server's read-only store leaves the trainer's temp files alone
        assert [info.version for info in CheckpointStore(tmp_path / "checkpoints").versions()] == [3]  # untouched


def test_trainer_publishes_and_a_server_picks_the_version_up(tmp_path, shapes):
    """The watcher thread (0.2 s interval) moves the server to the trainer's job-end version: the same
    number and bitwise the same weights, so both answer /score-loss identically."""
    trainer_settings = make_settings(tmp_path, role="trainer")
    server_settings = make_settings(tmp_path, role="server", reload_interval=0.2)
    images = labelled(shapes)
    with start_client(trainer_settings) as trainer, start_client(server_settings) as server:
        assert server.version == trainer.version == 0
        assert_same_weights(served_weights(server), served_weights(trainer))  # synced at start
        job = trainer.post("/finetune?wait=true", json={"images": images, "steps": 2}).json()
        assert job["status"] == "succeeded" and job["model_version"] == 2
        deadline = time.monotonic() + 30
        while server.version != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.version == 2
        assert_same_weights(served_weights(server), served_weights(trainer))
        served = server.post("/score-loss", json={"images": images}).json()
        trained = trainer.post("/score-loss", json={"images": images}).json()
        assert served["model_version"] == trained["model_version"] == 2
        assert served["loss"] == pytest.approx(trained["loss"], rel=1e-6)
        assert server.sample("ssd_model_reloads_total", outcome="loaded") == 1
        assert server.sample("ssd_model_version") == 2


def test_a_server_without_a_checkpoint_is_not_ready_until_the_first_one(tmp_path, shapes):
    """Its local initialisation is not version 0 of the trainer: it adopts the trainer's version 0."""
    with start_client(make_settings(tmp_path, role="server", reload_interval=STILL)) as server:
        assert_error(server.get("/readyz"), 503, None, "not_ready")
        watcher = server.app.state.watcher
        assert watcher.poll() is None and not watcher.synced
        expected = save_checkpoint(tmp_path / "checkpoints", 0, seed=2)
        published = watcher.poll()
        assert published is not None and published.version == 0 and watcher.synced
        assert_same_weights(served_weights(server), expected)
        assert server.get("/readyz").status_code == 200
        assert watcher.poll() is None  # the same version again is not reloaded
        assert server.sample("ssd_model_reloads_total", outcome="loaded") == 1


def test_half_written_corrupt_and_foreign_checkpoints_are_never_served(tmp_path):
    directory = tmp_path / "checkpoints"
    expected = save_checkpoint(directory, 1, seed=3)
    with start_client(make_settings(tmp_path, role="server", reload_interval=STILL)) as server:
        watcher = server.app.state.watcher
        # half-written: the data files of version 2 without the sidecar the trainer writes last; and a
        # trainer's temp file in flight, which a reader must not delete
        save_checkpoint(tmp_path / "elsewhere", 2, seed=4)
        for path in (tmp_path / "elsewhere").glob("ckpt-*.safetensors"):
            (directory / path.name).write_bytes(path.read_bytes())
        in_flight = directory / ".tmp-ckpt-ckpt-00000003.safetensors.x"
        in_flight.write_bytes(b"partial")
        assert watcher.poll() is None and server.version == 1
        assert in_flight.exists()  # (the writer's own CheckpointStore below does remove it)
        # corrupt: version 3's weights do not match its sidecar's sha256 -> falls back to nothing newer
        save_checkpoint(directory, 3, seed=5)
        weights = directory / "ckpt-00000003.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        assert watcher.poll() is None and server.version == 1
        # another architecture's checkpoint is refused too
        torch.manual_seed(6)
        CheckpointStore(directory).save(build_model("ssd-small", 4).state_dict(),
                                        {"version": 4, "model": "ssd300", "num_classes": 4})
        assert watcher.poll() is None and server.version == 1
        assert server.sample("ssd_model_reloads_total", outcome="failed") == 2
        assert watcher.poll() is None  # failed versions are not retried (their files never change)
        assert server.sample("ssd_model_reloads_total", outcome="failed") == 2
        assert_same_weights(served_weights(server), expected)
        good = save_checkpoint(directory, 5, seed=7)
        assert watcher.poll().version == 5 and server.version == 5
        assert_same_weights(served_weights(server), good)


def test_replica_settings_are_checked():
    with pytest.raises(ValidationError, match="workers=2 needs role=server"):
        Settings(workers=2, role="all")
    with pytest.raises(ValidationError, match="role=server needs checkpoint_dir"):
        Settings(role="server", checkpoint_dir=None)
    assert Settings(workers=2, role="server").workers == 2


def test_prepare_multiprocess_dir_empties_it_and_needs_it_for_several_workers(tmp_path, monkeypatch):
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    assert prepare_multiprocess_dir(1) is None
    with pytest.raises(ValueError, match=MULTIPROC_ENV):
        prepare_multiprocess_dir(2)
    directory = tmp_path / "prom"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"stale")
    (directory / "keep.txt").write_text("not ours")
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    assert prepare_multiprocess_dir(2) == directory
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]


WORKER = """
import sys
from prometheus_client import CollectorRegistry
from app.core.metrics import Metrics, exposition
metrics = Metrics(CollectorRegistry())
metrics.build.info({"version": "1", "torch": "2"})
count, version, in_flight = (int(v) for v in sys.argv[1:])
for _ in range(count):
    metrics.http_requests.labels(route="/detect", method="POST", status="200").inc()
metrics.model_version.set(version)
metrics.http_requests_in_progress.labels(route="/detect", method="POST").inc(in_flight)
sys.stdout.write(exposition(metrics).decode())
"""


def test_exposition_merges_the_worker_processes(tmp_path):
    """Two processes write to PROMETHEUS_MULTIPROC_DIR (the variable must be set before prometheus_client is
    imported, hence subprocesses); a third's exposition sums counters and in-flight gauges, takes the
    newest version, and keeps its own Info metric."""
    directory = tmp_path / "prom"
    directory.mkdir()
    env = {**os.environ, MULTIPROC_ENV: str(directory)}

    def run(*args: int) -> str:
        result = subprocess.run([sys.executable, "-c", WORKER, *map(str, args)], env=env, capture_output=True,
                                text=True, timeout=120, check=True)
        return result.stdout

    run(3, 5, 1)
    run(4, 7, 2)
    text = run(0, 6, 0)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    detect = (("method", "POST"), ("route", "/detect"))
    assert samples[("ssd_http_requests_total", (*detect, ("status", "200")))] == 7
    assert samples[("ssd_model_version", ())] == 7
    assert samples[("ssd_http_requests_in_progress", detect)] == 3  # livesum: every pid's file is still there
    assert samples[("ssd_build_info", (("torch", "2"), ("version", "1")))] == 1
