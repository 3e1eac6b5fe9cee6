"""The annotation stream (app.online.annotation_stream): batches of SSD_STREAM_BATCH_IMAGES, a task's newer
annotation replacing its pending one, deletions, a full queue, and Start Training's last smaller batch."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry

from app.core.errors import JobQueueFull
from app.core.metrics import Metrics
from app.online.annotation_stream import AnnotationStream, StreamedImage
from app.online.job_view import JobSource, LabelStudioAnnotation
from app.online.jobs import Job
from ssd_core.data.datasets import Sample
from tests.app.conftest import make_settings


class QueueOf:
    """Takes jobs like FinetuneWorker.submit while it has room."""

    def __init__(self, room: int) -> None:
        self.room, self.jobs = room, []

    def submit(self, samples, images, steps, learning_rate, augment, force=False, replay=None,
               source=JobSource.api, label_studio=None):
        if self.room == 0:
            raise JobQueueFull("queue_full", "full")
        self.room -= 1
        job = Job(samples, steps, learning_rate, augment, images=images, source=source, label_studio=label_studio)
        self.jobs.append(job)
        return job


def image(task: int, annotation: int) -> StreamedImage:
    sample = Sample(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.tensor([[1.0, 1, 5, 5]]), torch.tensor([0]),
                    torch.tensor([False]))
    return StreamedImage(LabelStudioAnnotation(project_id=1, task_id=task, annotation_id=annotation), sample,
                         f"{task}:{annotation}".encode())


def stream(tmp_path, room: int) -> tuple[AnnotationStream, QueueOf, Metrics]:
    worker, metrics = QueueOf(room), Metrics(CollectorRegistry())
    return AnnotationStream(worker, make_settings(tmp_path, stream_batch_images=3, stream_steps=5), metrics), worker, metrics


def origins(job: Job) -> list[tuple[int, int]]:
    return [(o.task_id, o.annotation_id) for o in job.label_studio]


def test_batches_replacements_and_deletions(tmp_path):
    s, _, metrics = stream(tmp_path, room=5)
    assert s.add(image(1, 10)) == [] and s.add(image(2, 20)) == []
    assert s.add(image(1, 11)) == []  # task 1 annotated again: still two images pending
    assert s.remove(20) and not s.remove(20) and s.pending == 1
    s.add(image(3, 30))
    [job] = s.add(image(4, 40))
    assert origins(job) == [(1, 11), (3, 30), (4, 40)]
    assert job.source == JobSource.label_studio and job.steps_total == 5 and job.images == [b"1:11", b"3:30", b"4:40"]
    assert job.augment == "flip"  # SSD_STREAM_AUGMENT's default
    assert s.pending == 0 and metrics.registry.get_sample_value("ssd_label_studio_stream_jobs_total") == 1


def test_a_full_queue_keeps_images_pending(tmp_path):
    s, worker, metrics = stream(tmp_path, room=0)
    for task in range(7):
        s.add(image(task, 100 + task))
    assert worker.jobs == [] and s.pending == 7
    assert metrics.registry.get_sample_value("ssd_label_studio_pending_images") == 7
    worker.room = 1
    assert len(s.flush()) == 1 and s.pending == 4  # the oldest three
    worker.room = 5
    jobs = s.add_all([image(9, 90)])  # Start Training: everything, the last batch smaller
    assert [len(job.label_studio) for job in jobs] == [3, 2] and s.pending == 0
    assert origins(worker.jobs[0]) == [(0, 100), (1, 101), (2, 102)]


def test_stream_jobs_train_with_the_configured_augmentation(tmp_path):
    for setting, expected in (("none", None), ("ssd", "ssd")):
        worker = QueueOf(room=1)
        settings = make_settings(tmp_path, stream_batch_images=2, stream_augment=setting)
        s = AnnotationStream(worker, settings, Metrics(CollectorRegistry()))
        s.add(image(1, 10))
        [job] = s.add(image(2, 20))
        assert job.augment == expected
