"""Replay in the service: only succeeded jobs' images enter the memory, later steps train on replayed
images (class-balanced, counted per step, listed in the job view), the per-job override, metrics and a restart."""

from __future__ import annotations

import pytest

import app.online.gatekeeper
from ssd_core.loss.partial_labels import labelled_class_mask
from ssd_core.online.gate import GateDecision
from ssd_core.online.replay import ReplayMemory
from tests.app.conftest import CriterionSpy, assert_error, labelled, make_settings, start_client
from tests.app.online.test_worker import wait_for


def _finetune(client, shapes, indices=(0, 1), **options) -> dict:
    response = client.post("/finetune?wait=true", json={"images": labelled(shapes, indices), **options})
    assert response.status_code == 200, response.text
    return response.json()


def _memory(settings) -> ReplayMemory:
    return ReplayMemory(settings.checkpoint_dir / "replay", 100, 2**30, settings.max_image_pixels)


def test_succeeded_jobs_fill_the_memory_and_later_steps_replay_from_it(tmp_path, shapes):
    settings = make_settings(tmp_path, replay_ratio=1.0)
    with start_client(settings) as client:
        first = _finetune(client, shapes, steps=1)
        assert first["replay"] is None and first["losses"][0]["replayed"] == 0  # nothing to replay yet
        assert client.sample("ssd_replay_images") == 2
        memory = _memory(settings)
        expected = memory.class_counts()
        for label, name in enumerate(settings.class_names):
            assert client.sample("ssd_replay_class_images", **{"class": name}) == expected.get(label, 0)

        second = _finetune(client, shapes, (2, 3, 4), steps=2)
        assert [step["replayed"] for step in second["losses"]] == [3, 3]  # ratio 1 x 3 images, from 2 stored
        replay = second["replay"]
        assert replay["ratio"] == 1.0 and replay["memory_images"] == 2 and replay["images"] == 6
        assert sorted(replay["keys"]) == memory.store.keys()  # both stored images were drawn
        classes = {name for i in (0, 1) for name in (settings.class_name(x) for x in shapes[i].labels.tolist())}
        assert set(replay["per_class"]) == classes
        assert client.get(f"/finetune/{second['job_id']}").json()["replay"] == replay
        assert client.sample("ssd_replayed_images_per_step_count") == 2
        assert client.sample("ssd_replayed_images_per_step_sum") == 6
        assert client.sample("ssd_images_processed_total", route="/finetune") == 2 + 2 * 3  # sent images, per step
        assert client.sample("ssd_replay_images") == 5

        half = _finetune(client, shapes, (5, 6), steps=1, replay=0.5)
        assert half["losses"][0]["replayed"] == 1 and half["replay"]["ratio"] == 0.5
        off = _finetune(client, shapes, (0, 1), steps=1, replay=0)
        assert off["replay"] is None and off["losses"][0]["replayed"] == 0
    with start_client(settings) as client:  # the memory and the job views survive a restart
        assert client.sample("ssd_replay_images") == 7
        assert client.get(f"/finetune/{second['job_id']}").json()["replay"] == replay


def test_failed_and_cancelled_jobs_never_enter_the_memory(tmp_path, shapes):
    settings = make_settings(tmp_path, max_learning_rate=1e31)
    with start_client(settings) as client:
        failed = _finetune(client, shapes, steps=2, learning_rate=1e30)  # every step wrecks: all skipped
        assert failed["status"] == "failed", failed
        running = client.post("/finetune", json={"images": labelled(shapes, (2, 3)), "steps": 200}).json()
        client.delete(f"/finetune/{running['job_id']}")
        assert wait_for(client, running["job_id"], {"cancelled"})["status"] == "cancelled"
        assert client.sample("ssd_replay_images") == 0
    assert len(_memory(settings)) == 0


@pytest.mark.parametrize("value", [-1, 9, "many"])
def test_bad_replay_ratio_is_a_422_naming_the_field(client, unchanged, shapes, value):
    response = client.post("/finetune", json={"images": labelled(shapes), "replay": value})
    assert_error(response, 422, "replay")


def test_a_rejected_job_never_enters_the_memory_and_an_accepted_one_does(tmp_path, shapes, monkeypatch):
    """Gated: the gate's rejection (forced here by the decision rule) keeps the job's images out; the
    accepted job's training images (not its held-out ones) go in."""
    settings = make_settings(tmp_path, publish="gated", gate_min_images=1, holdout_fraction=0.5)
    with start_client(settings) as client:
        assert client.post("/validation", json={"images": labelled(shapes, (6, 7))}).status_code == 200
        monkeypatch.setattr(app.online.gatekeeper, "decide", lambda *args: GateDecision("rejected", reason="forced"))
        rejected = _finetune(client, shapes, (0, 2, 4, 5), steps=1)  # 0 held out by its hash
        assert rejected["status"] == "rejected" and rejected["steps_done"] == 1, rejected
        assert client.sample("ssd_replay_images") == 0
        monkeypatch.setattr(app.online.gatekeeper, "decide", lambda *args: GateDecision("published"))
        accepted = _finetune(client, shapes, (3, 2, 4, 5), steps=1)  # the same three train, 3 held out
        assert accepted["status"] == "succeeded" and 0 < accepted["held_out"] < 4, accepted
        assert client.sample("ssd_replay_images") == 4 - accepted["held_out"]
        validation = {entry["key"] for entry in client.get("/validation").json()["entries"]}
    assert len(validation) == 2 + accepted["held_out"]
    assert not validation & set(_memory(settings).store.keys())  # PNG keys: never an image the set holds
    assert len(_memory(settings)) == 4 - accepted["held_out"]


def test_replayed_images_keep_their_partial_labels_in_later_steps(client, shapes):
    """A job declaring `labelled_classes` leaves its images in the memory with them: a later job that
    declares nothing trains its own images unmasked and the replayed ones masked as when sent."""
    declared = sorted(set(shapes[0].labels.tolist()) | set(shapes[1].labels.tolist()))
    first = client.post("/finetune?wait=true", json={"images": labelled(shapes, (0, 1)), "steps": 1,
                                                      "labelled_classes": declared})
    assert first.json()["status"] == "succeeded", first.text
    spy = CriterionSpy.install(client)
    second = _finetune(client, shapes, (2, 3), steps=1, replay=1)
    assert second["losses"][0]["replayed"] == 2
    masked = labelled_class_mask([declared], 4).tolist()[0]
    training_mask = spy.masks[0]  # the step's own compute (its verification repeats it)
    assert training_mask[:2] == [[True] * 4] * 2  # the job's own images: every class
    assert training_mask[2:] == [masked, masked]  # the replayed ones: as declared
