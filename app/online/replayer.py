"""The replay memory as the trainer thread uses it (the memory itself: ssd_core.online.replay).

How many images a job's steps replay, drawing them class-balanced into the job's `replay` view,
offering an accepted job's training images to the memory, and the replay gauges. Only the trainer
thread calls it.
"""

from __future__ import annotations

import logging

from app.core.metrics import Metrics
from app.core.settings import Settings
from app.online.jobs import Job
from ssd_core.data.datasets import Sample
from ssd_core.online.replay import NO_OBJECT, ReplayMemory

logger = logging.getLogger(__name__)


class Replayer:
    """Args: memory (in the checkpoint directory), or None: nothing is replayed or remembered."""

    def __init__(self, memory: ReplayMemory | None, settings: Settings, metrics: Metrics) -> None:
        self.memory = memory
        self.settings = settings
        self.metrics = metrics
        self.update_metrics()

    def available(self, job: Job) -> int:
        """Images the memory could add to each of `job`'s steps: its size, or 0 when the job replays nothing."""
        if self.memory is None or job.replay_ratio == 0:
            return 0
        return len(self.memory)

    def per_step(self, job: Job, new_images: int) -> int:
        """Replayed images per step of `job` (0 without a memory, with an empty one or ratio 0); opens its view."""
        if self.memory is None or not len(self.memory) or job.replay_ratio == 0:
            return 0
        job.open_replay(len(self.memory))
        return max(1, round(job.replay_ratio * new_images))

    def draw(self, job: Job, count: int) -> list[Sample]:
        """Draw `count` images class-balanced and note them in the job's view."""
        if count == 0:
            return []
        assert self.memory is not None
        draw = self.memory.draw(count)
        job.record_replayed([self._class_names(sample.labels.tolist()) for sample in draw.samples], draw.keys)
        self.metrics.replayed_images_per_step.observe(len(draw.samples))
        return draw.samples

    def remember(self, job: Job, samples: list[Sample]) -> None:
        """Offer an accepted job's training images to the memory; a failed write is logged, never raised."""
        if self.memory is None or not samples:
            return
        try:
            self.memory.add(samples, {"job_id": job.job_id})
        except Exception:
            logger.exception("storing job %s's images in the replay memory failed", job.job_id)
        self.update_metrics()

    def update_metrics(self) -> None:
        """Set the replay-memory gauges (images in total and per class) from the memory."""
        if self.memory is None:
            return
        self.metrics.replay_images.set(len(self.memory))
        counts = self.memory.class_counts()
        names = ["no_object", *self.settings.object_class_names()]
        for label, name in zip([NO_OBJECT, *range(self.settings.num_classes - 1)], names, strict=True):
            self.metrics.replay_class_images.labels(**{"class": name}).set(counts.get(label, 0))

    def _class_names(self, labels: list[int]) -> list[str]:
        return sorted({self.settings.class_name(label) for label in labels}) or ["no_object"]
