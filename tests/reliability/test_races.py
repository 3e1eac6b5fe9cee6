"""Public calls racing each other in one process: exports and rollbacks against running fine-tune jobs.

Tracing (export) and the trainer's backward pass share torch's process-global FX state; when they ran at
once a clean job could end `failed` (`KeyError: 'custom'`) and an export or a rollback answer 500, and a
rollback that failed half-way left the trainer on other weights than the served ones. Here every export
and step is timed to prove they never overlap, every call must end correctly, and a rollback that fails
part-way must leave the trainer, its optimizer and the served version exactly as they were.
"""

from __future__ import annotations

import copy
import io
import threading
import time

import pytest
import torch

import app.serving.export as export_module
from tests.app.conftest import OVERFIT, assert_error, labelled, make_settings, start_client

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit")

ROUNDS = 5


class Intervals:
    """(start, end) of every call of the wrapped functions, by kind."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: dict[str, list[tuple[float, float]]] = {"step": [], "export": []}

    def wrap(self, kind: str, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                with self.lock:
                    self.spans[kind].append((start, time.perf_counter()))

        return timed

    def overlaps(self) -> list[tuple[tuple[float, float], tuple[float, float]]]:
        return [(s, e) for s in self.spans["step"] for e in self.spans["export"] if s[0] < e[1] and e[0] < s[1]]


def test_exports_and_rollbacks_against_running_jobs_all_end_correctly(tmp_path, monkeypatch):
    items = labelled(OVERFIT)
    with start_client(make_settings(tmp_path, finetune_max_steps=100)) as client:
        intervals = Intervals()
        trainer = client.app.state.worker.trainer
        monkeypatch.setattr(trainer, "step", intervals.wrap("step", trainer.step))
        monkeypatch.setattr(export_module, "export_model", intervals.wrap("export", export_module.export_model))
        answers: list[tuple[str, int, str]] = []
        assert client.post("/model/versions/0/pin").status_code == 200  # the rollback target outlives pruning

        def export(fmt: str) -> None:
            response = client.get("/model/export", params={"format": fmt})
            answers.append(("export", response.status_code, response.text[:200] if response.status_code != 200 else ""))
            if response.status_code == 200 and fmt == "torchscript":
                torch.jit.load(io.BytesIO(response.content), map_location="cpu")  # a whole, loadable file

        def rollback() -> None:
            response = client.post("/model/rollback", json={"version": 0})
            code = response.json().get("error", {}).get("code", "") if response.status_code != 200 else ""
            answers.append(("rollback", response.status_code, code))

        jobs = []
        for round_index in range(ROUNDS):
            job = client.post("/finetune", json={"images": items, "steps": 6, "learning_rate": 1e-4}).json()
            jobs.append(job["job_id"])
            deadline = time.monotonic() + 60
            while client.get(f"/finetune/{job['job_id']}").json()["steps_done"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            racers = [threading.Thread(target=export, args=("onnx" if round_index == 0 else "torchscript",)),
                      threading.Thread(target=rollback)]
            for racer in racers:
                racer.start()
            for racer in racers:
                racer.join(timeout=120)
            done = client.get(f"/finetune/{job['job_id']}").json()
            deadline = time.monotonic() + 120
            while done["status"] in ("queued", "running") and time.monotonic() < deadline:
                time.sleep(0.05)
                done = client.get(f"/finetune/{job['job_id']}").json()
            assert done["status"] == "succeeded", done
            rollback()  # between jobs: it goes through
            assert answers[-1] == ("rollback", 200, "") and client.get("/model").json()["restored_from"] == 0
        for kind, status, detail in answers:
            assert status == 200 or (kind, status, detail) == ("rollback", 409, "trainer_busy"), answers
        assert [kind for kind, *_ in answers].count("export") == ROUNDS
        assert intervals.spans["export"] and len(intervals.spans["step"]) == 6 * ROUNDS
        assert intervals.overlaps() == [], "an export ran during a training step"


def test_a_rollback_that_fails_half_way_changes_nothing(tmp_path, monkeypatch):
    """The optimizer refuses the saved state after the weights were loaded: 500 `rollback_failed`, and the
    trainer (weights, optimizer, steps), the served version and the next version number are as before."""
    with start_client(make_settings(tmp_path)) as client:
        assert client.post("/finetune?wait=true", json={"images": labelled(OVERFIT), "steps": 2}).json()[
            "status"] == "succeeded"
        trainer = client.app.state.worker.trainer
        weights = copy.deepcopy(trainer.module.state_dict())
        optimizer = copy.deepcopy(trainer.optimizer.state_dict())
        served = client.app.state.host.current

        def refuse(state):
            raise RuntimeError("loaded state dict contains a parameter group that doesn't match")

        monkeypatch.setattr(trainer.optimizer, "load_state_dict", refuse)
        error = assert_error(client.post("/model/rollback", json={"version": 0}), 500, "version", "rollback_failed")
        assert "changed nothing (version 2 is served)" in error["message"]
        monkeypatch.undo()

        assert client.app.state.host.current is served
        assert all(torch.equal(weights[k], v) for k, v in trainer.module.state_dict().items())
        after = trainer.optimizer.state_dict()
        assert all(torch.equal(optimizer["state"][i]["exp_avg"], s["exp_avg"]) for i, s in after["state"].items())
        assert trainer.steps == 2
        assert client.post("/model/rollback", json={"version": 0}).json()["version"] == 3  # the rollback still works


def test_a_rollback_whose_checkpoint_fails_changes_nothing(tmp_path, monkeypatch):
    """The new version cannot be written: 503 `checkpoint_failed`, nothing published, the trainer as
    before; the number that checkpoint may have named is never handed out."""
    with start_client(make_settings(tmp_path)) as client:
        client.post("/finetune?wait=true", json={"images": labelled(OVERFIT), "steps": 1})
        trainer = client.app.state.worker.trainer
        weights = copy.deepcopy(trainer.module.state_dict())

        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(client.app.state.store, "save", full)
        error = assert_error(client.post("/model/rollback", json={"version": 0}), 503, None, "checkpoint_failed")
        assert "not rolled back, version 1 is still served" in error["message"]
        monkeypatch.undo()
        assert client.version == 1 and client.get("/model").json()["restored_from"] is None
        assert all(torch.equal(weights[k], v) for k, v in trainer.module.state_dict().items())
        assert client.post("/model/rollback", json={"version": 0}).json()["version"] == 3  # 2 is skipped
