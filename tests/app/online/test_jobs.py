"""A job's lifecycle (app.online.jobs.Job): the transitions it allows, what it records while running,
and the view it gives back after a journal round trip."""

from __future__ import annotations

import pytest
import torch

from app.core.errors import Conflict
from app.online.job_view import JobSource, JobState, JobView, LabelStudioAnnotation, StepLoss
from app.online.jobs import Job, JobTransitionError
from ssd_core.loss.stats import ClassStats


def _job() -> Job:
    return Job([], steps_total=3, learning_rate=None, augment=None, images=[b"png"], replay_ratio=0.5)


def _stats(truths: list[int]) -> ClassStats:
    counts = torch.tensor(truths)
    return ClassStats(counts, counts, torch.zeros_like(counts), counts.float(), counts.float(), counts.float(),
                      torch.tensor(0.0), torch.tensor(2.0))


def _step(step: int, skipped: bool = False, version: int = 1) -> StepLoss:
    return StepLoss(step=step, loss_l=None if skipped else 1.0, loss_c=None if skipped else 2.0, skipped=skipped,
                    learning_rate=1e-3, model_version=version)


def test_a_job_runs_then_finishes_and_wakes_its_waiters_only_then():
    job = _job()
    with pytest.raises(JobTransitionError):
        job.notify_finished()
    job.start()
    assert job.state == JobState.running and job.started_at is not None
    job.finish(JobState.succeeded)
    assert job.finished_at is not None and job.samples is None and job.images is None
    assert not job.finished.done()  # the queue makes the final state durable first
    job.notify_finished()
    assert job.finished.done()


@pytest.mark.parametrize("final", [JobState.succeeded, JobState.failed, JobState.rejected])
def test_a_queued_job_can_only_start_or_be_cancelled(final):
    job = _job()
    with pytest.raises(JobTransitionError, match=f"queued: it cannot become {final.value}"):
        job.finish(final)
    job.finish(JobState.cancelled, "cancelled before it started")
    assert job.state == JobState.cancelled and job.error == "cancelled before it started"


def test_a_finished_job_changes_no_more_and_refuses_a_cancel():
    job = _job()
    job.start()
    job.finish(JobState.failed, "boom")
    for change in (job.start, lambda: job.finish(JobState.cancelled), lambda: job.set_held_out(1),
                   lambda: job.record_step(_step(1), None, []), lambda: job.set_checkpoint(None)):
        with pytest.raises(JobTransitionError):
            change()
    with pytest.raises(Conflict, match="already failed"):
        job.request_cancel()
    with pytest.raises(JobTransitionError, match="not a final state"):
        _job().finish(JobState.running)


def test_only_a_running_job_records_training():
    job = _job()
    with pytest.raises(JobTransitionError, match="queued: cannot record a step"):
        job.record_step(_step(1), None, [])
    job.start()
    job.request_cancel()
    assert job.cancel_requested


def test_steps_pool_per_class_figures_and_skipped_steps_count():
    job = _job()
    job.start()
    job.record_step(_step(1, version=1), _stats([1, 0]), ["a", "b"])
    job.record_step(_step(2, skipped=True, version=1), None, ["a", "b"])
    job.record_step(_step(3, version=2), _stats([2, 3]), ["a", "b"])
    assert job.steps_done == 3 and job.skipped_steps == 1 and job.model_version == 2 and len(job.losses) == 3
    assert [(row.class_name, row.num_ground_truth) for row in job.per_class] == [("a", 3), ("b", 3)]


def test_replayed_images_are_counted_per_class_and_keys_shown_once():
    job = _job()
    job.start()
    with pytest.raises(JobTransitionError, match="replays nothing"):
        job.record_replayed([["a"]], ["k1"])
    job.open_replay(memory_images=10)
    job.record_replayed([["a"], ["a", "b"]], ["k1", "k2"])
    job.record_replayed([["no_object"]], ["k1"])
    assert job.replay is not None and job.replay.ratio == 0.5 and job.replay.images == 3
    assert job.replay.per_class == {"a": 2, "b": 1, "no_object": 1} and job.replay.keys == ["k1", "k2"]


def test_a_journalled_view_restores_a_finished_job_with_the_same_view():
    job = _job()
    job.start()
    job.set_held_out(1)
    job.record_step(_step(1), _stats([1, 2]), ["a", "b"])
    job.finish(JobState.succeeded)
    restored = Job.from_view(job.view())
    assert restored.view() == job.view() and restored.finished.done()


def test_source_and_label_studio_origin_survive_the_journal():
    origin = [LabelStudioAnnotation(project_id=1, task_id=7, annotation_id=9)]
    job = Job(None, 3, None, None, source=JobSource.label_studio, label_studio=origin)
    job.start()
    job.finish(JobState.succeeded)
    line = job.view().model_dump_json()  # one journal line
    restored = Job.from_view(JobView.model_validate_json(line))
    assert restored.view() == job.view() and restored.source == JobSource.label_studio
    assert restored.label_studio == origin
    assert JobView.model_validate_json(line.replace('"source":"label-studio",', "")).source == JobSource.api  # old lines


def test_the_augmentation_is_named_in_the_view_and_survives_the_journal():
    for augment, flag in ((None, False), ("flip", True), ("ssd", True)):
        job = Job(None, 3, None, augment)
        job.start()
        job.finish(JobState.succeeded)
        view = JobView.model_validate_json(job.view().model_dump_json())
        assert (view.augment, view.augmentation) == (flag, augment)
        assert Job.from_view(view).augment == augment
    old = Job(None, 3, None, "ssd").view().model_dump(mode="json")
    del old["augmentation"]  # a journal line written before the field existed: `augment: true` was SSD's
    assert Job.from_view(JobView.model_validate(old)).augment == "ssd"
