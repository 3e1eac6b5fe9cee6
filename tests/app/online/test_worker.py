"""The fine-tune queue and its thread (app.online.worker): jobs queue then run, queue full, cancel, the
limit on the learning rate, and the job journal across restarts."""

from __future__ import annotations

import json
import time

import pytest

from tests.app.conftest import (
    OVERFIT,
    assert_error,
    labelled,
    make_settings,
    start_client,
)


def wait_for(client, job_id: str, states: set[str], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/finetune/{job_id}").json()
        if job["status"] in states:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {job}")


def test_accepted_job_is_queued_then_runs(client, shapes):
    response = client.post("/finetune", json={"images": labelled(shapes, (2, 3)), "steps": 2})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] in {"queued", "running", "succeeded"}
    assert job["steps_total"] == 2 and job["num_images"] == 2
    done = wait_for(client, job["job_id"], {"succeeded"})
    assert done["steps_done"] == 2
    assert all(step["loss_l"] is not None and step["loss_c"] is not None for step in done["losses"])
    assert done["learning_rate"] is None  # the default schedule (SSD_LEARNING_RATE)
    assert done["losses"][0]["learning_rate"] == pytest.approx(1e-3)


def test_queue_full_cancel_queued_and_running(tmp_path, shapes):
    with start_client(make_settings(tmp_path, finetune_queue_size=2)) as client:
        items = labelled(shapes, (0, 1))
        long_job = client.post("/finetune", json={"images": items, "steps": 200}).json()
        wait_for(client, long_job["job_id"], {"running"})
        queued = [client.post("/finetune", json={"images": items, "steps": 1}).json() for _ in range(2)]
        assert [job["status"] for job in queued] == ["queued", "queued"]
        assert client.sample("ssd_finetune_queue_depth") == 2
        assert_error(client.post("/finetune", json={"images": items}), 429, None, "queue_full")

        cancelled = client.delete(f"/finetune/{queued[0]['job_id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        client.delete(f"/finetune/{queued[1]['job_id']}")
        assert client.sample("ssd_finetune_queue_depth") == 0
        stopping = client.delete(f"/finetune/{long_job['job_id']}").json()
        assert stopping["cancel_requested"]
        final = wait_for(client, long_job["job_id"], {"cancelled"})
        assert final["steps_done"] < 200
        # the model stays at the last completed step
        last_version = final["losses"][-1]["model_version"] if final["losses"] else 0
        assert client.version == last_version == (final["model_version"] or 0)
        assert client.sample("ssd_finetune_jobs_total", state="cancelled") == 3
        assert_error(client.delete(f"/finetune/{long_job['job_id']}"), 409, "job_id", "job_finished")
        for job in queued:
            assert client.get(f"/finetune/{job['job_id']}").json()["steps_done"] == 0


def journal_records(settings) -> list[dict]:
    return [json.loads(line) for line in (settings.checkpoint_dir / "jobs.jsonl").read_text().splitlines()]


def test_jobs_survive_a_restart_and_unfinished_ones_read_failed(tmp_path, shapes):
    settings = make_settings(tmp_path, job_history=3)
    with start_client(settings) as client:
        done = client.post("/finetune?wait=true", json={"images": labelled(shapes), "steps": 1}).json()
        assert [r["status"] for r in journal_records(settings)] == ["queued", "running", "succeeded"]
        assert done["checkpoint"] == {"saved": True, "version": 1, "error": None}
    assert journal_records(settings) == [done]  # compacted on shutdown: one record per job
    journal = settings.checkpoint_dir / "jobs.jsonl"
    crashed = [{**done, "job_id": f"crashed-{state}", "status": state, "finished_at": None, "checkpoint": None}
               for state in ("queued", "running")]
    with journal.open("a") as f:  # what kill -9 leaves: last records not final, a torn last line
        f.writelines(json.dumps(record) + "\n" for record in crashed)
        f.write('{"job_id": "torn", "sta')
    with start_client(settings) as client:
        assert client.get(f"/finetune/{done['job_id']}").json() == done
        for record in crashed:
            job = client.get(f"/finetune/{record['job_id']}").json()
            assert job["status"] == "failed" and job["error"].startswith("interrupted"), job
            assert job["model_version"] == 1 and job["finished_at"] is not None
        assert_error(client.delete("/finetune/crashed-running"), 409, "job_id", "job_finished")
        assert_error(client.get("/finetune/torn"), 404, "job_id")
        assert len(journal_records(settings)) == 3  # compacted at start, the torn line dropped
        for _ in range(2):
            client.post("/finetune?wait=true", json={"images": labelled(shapes), "steps": 1})
    records = journal_records(settings)  # bounded by SSD_JOB_HISTORY: the oldest job is forgotten
    assert len(records) == 3 and done["job_id"] not in {r["job_id"] for r in records}


def test_a_queued_job_is_on_disk_before_the_202(client, shapes):
    settings = client.app.state.settings
    running = client.post("/finetune", json={"images": labelled(shapes), "steps": 200}).json()
    queued = client.post("/finetune", json={"images": labelled(shapes), "steps": 1})
    assert queued.status_code == 202
    last = {r["job_id"]: r for r in journal_records(settings)}
    assert last[queued.json()["job_id"]]["status"] == "queued"
    assert last[running["job_id"]]["status"] in {"queued", "running"}
    cancelled = client.delete(f"/finetune/{queued.json()['job_id']}").json()
    last = {r["job_id"]: r for r in journal_records(settings)}
    assert last[cancelled["job_id"]] == cancelled  # a final state is recorded before the answer
    client.delete(f"/finetune/{running['job_id']}")


def test_the_default_learning_rate_limit_is_ten_times_the_recipes_rate(tmp_path):
    assert make_settings(tmp_path).learning_rate_limit() == pytest.approx(0.01)  # AdamW 1e-3
    assert make_settings(tmp_path, optimizer="sgd", learning_rate=0.005).learning_rate_limit() == pytest.approx(0.05)
    with start_client(make_settings(tmp_path)) as client:
        refused = client.post("/finetune", json={"images": labelled(OVERFIT), "learning_rate": 0.011})
        assert "10 x SSD_LEARNING_RATE" in assert_error(refused, 422, "learning_rate")["message"]
        job = client.post("/finetune?wait=true", json={"images": labelled(OVERFIT), "learning_rate": 0.01}).json()
        assert job["status"] == "succeeded" and job["learning_rate"] == 0.01
