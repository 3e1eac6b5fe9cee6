"""The job journal (app.online.journal): the last record per job survives a torn line, and restoring
keeps the newest jobs, a job left unfinished reading failed ("interrupted") with the restored version."""

from __future__ import annotations

from app.online.job_view import JobState
from app.online.jobs import Job
from app.online.journal import INTERRUPTED, JobJournal


def _view(state: JobState):
    job = Job(None, 1, None, None)
    if state != JobState.queued:
        job.start()
    if state.finished:
        job.finish(state)
    return job.view()


def test_restore_keeps_the_newest_jobs_and_marks_unfinished_ones_interrupted(tmp_path):
    journal = JobJournal(tmp_path, history=3)
    old, done, queued, running = (_view(s) for s in (JobState.succeeded, JobState.cancelled, JobState.queued,
                                                     JobState.running))
    for view in (old, done, queued, running):
        journal.append(view, durable=False)
    journal.append(done.model_copy(update={"error": "last record wins"}), durable=True)
    with journal.path.open("ab") as f:
        f.write(b'{"job_id": "torn", "sta')
    views = JobJournal(tmp_path, history=3).restore(restored_version=7)
    assert [v.job_id for v in views] == [done.job_id, queued.job_id, running.job_id]  # the oldest forgotten
    assert views[0].status == JobState.cancelled and views[0].error == "last record wins"
    for view in views[1:]:
        assert view.status == JobState.failed and view.error == INTERRUPTED and view.model_version == 7
        assert view.finished_at is not None
