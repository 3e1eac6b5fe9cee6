"""Label Studio's webhooks, taken as notifications only.

Label Studio posts a webhook for every project event inside the annotator's save request (a 1 s timeout,
no retry) and without credentials, so anyone able to reach the service can send one. `notify` therefore
only queues the annotation (or project) id and answers at once; the intake's own thread then asks Label
Studio, with the service's key, for the annotation, its task, the project's label config and the image,
and trains on what Label Studio returns, never on the webhook's body. A webhook naming an annotation
Label Studio does not have trains nothing (counted `not_found`).

Actions: ANNOTATION_CREATED / ANNOTATION_UPDATED add the task's image to the annotation stream (a newer
annotation of a task replaces its pending one), ANNOTATION_DELETED drops a pending one once Label Studio
confirms it is gone, START_TRAINING pulls every annotated task of the project (paged) and trains on all of
them; any other action is acknowledged and counted as `other`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from app.core.errors import InvalidValue, Unavailable
from app.core.metrics import LABEL_STUDIO_ACTIONS, Metrics
from app.core.settings import Settings
from app.labelstudio.client import LabelStudioClient, LabelStudioError
from app.labelstudio.protocol import (
    LabelConfigError,
    RectangleControl,
    annotation_boxes,
    parse_label_config,
    task_image_url,
)
from app.online.annotation_stream import AnnotationStream, StreamedImage
from app.online.job_view import LabelStudioAnnotation
from ssd_core.data.datasets import Sample
from ssd_core.data.images import ImageError, decode_image_bytes

logger = logging.getLogger(__name__)

QUEUE_CAPACITY = 10_000  # webhooks waiting for the intake's thread; beyond: 503 (Label Studio does not retry)
CONFIG_TTL_S = 60.0  # a project's label config is asked for again after this
IDLE_FLUSH_S = 1.0  # with no webhook for this long, pending full batches are offered to the queue again
ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")


@dataclass(frozen=True)
class _Event:
    action: str
    object_id: int  # the annotation's id, or the project's for START_TRAINING


class _Skipped(Exception):
    """An annotation not trained on; `outcome` is its ssd_label_studio_annotations_total label."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome


class WebhookIntake:
    """The queue of webhooks and the thread that fetches what they name from Label Studio.

    Args:
        client: Label Studio, with the service's key.
        stream: where annotated images go.
    """

    def __init__(self, client: LabelStudioClient, stream: AnnotationStream, settings: Settings,
                 metrics: Metrics) -> None:
        self.client = client
        self.stream = stream
        self.settings = settings
        self.metrics = metrics
        self._class_names = settings.object_class_names()
        self._queue: queue.Queue[_Event | None] = queue.Queue(QUEUE_CAPACITY)
        self._configs: dict[int, tuple[RectangleControl, float]] = {}  # project -> (control, fetched at)
        self._thread = threading.Thread(target=self._run, name="label-studio-intake", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Finish the webhook in hand and stop (the queued ones are dropped: Label Studio keeps the
        annotations, and "Start Training" pulls them again)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # ---- the request's side: never blocks, never calls Label Studio

    def notify(self, payload: Mapping) -> str:
        """Queue the webhook's annotation or project id. Returns "queued" or "ignored" (an action the
        backend does not act on). Raises InvalidValue naming the missing id, Unavailable when the queue is full."""
        action = payload.get("action")
        self.metrics.label_studio_webhooks.labels(
            action=action if action in LABEL_STUDIO_ACTIONS else "other").inc()
        if action in (*ANNOTATION_ACTIONS, "ANNOTATION_DELETED"):
            event = _Event(action, _object_id(payload, "annotation"))
        elif action == "START_TRAINING":
            event = _Event(action, _object_id(payload, "project"))
        else:
            return "ignored"
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.metrics.label_studio_annotations.labels(outcome="dropped").inc()
            raise Unavailable("webhook_queue_full", f"{QUEUE_CAPACITY} webhooks are waiting; press Start Training "
                              "later to train on the annotations this one named", retry_after_s=5) from None
        return "queued"

    # ---- the intake's thread

    def _run(self) -> None:
        while True:
            try:
                event = self._queue.get(timeout=IDLE_FLUSH_S)
            except queue.Empty:
                self.stream.flush()
                continue
            if event is None:
                return
            try:
                self.handle(event)
            except Exception:  # one bad webhook must not stop the intake
                logger.exception("Label Studio webhook %s %d failed", event.action, event.object_id)
                self.metrics.label_studio_annotations.labels(outcome="failed").inc()

    def handle(self, event: _Event) -> None:
        """Act on one webhook (in the intake's thread; tests call it directly)."""
        if event.action in ANNOTATION_ACTIONS:
            self._annotation_saved(event.object_id)
        elif event.action == "ANNOTATION_DELETED":
            self._annotation_deleted(event.object_id)
        else:
            self._start_training(event.object_id)

    def _annotation_saved(self, annotation_id: int) -> None:
        try:
            annotation = self.client.annotation(annotation_id)
            if annotation is None:
                raise _Skipped("not_found", f"Label Studio has no annotation {annotation_id}")
            task = self.client.task(int(annotation["task"]))
            if task is None:
                raise _Skipped("not_found", f"Label Studio has no task {annotation['task']}")
            item = self._streamed(annotation, task, self._control(int(task["project"])))
        except _Skipped as skipped:
            self._count_skip(annotation_id, skipped)
            self.stream.remove(annotation_id)  # a cancelled (skipped) task's earlier image must not train either
            return
        self.stream.add(item)
        self.metrics.label_studio_annotations.labels(outcome="streamed").inc()

    def _annotation_deleted(self, annotation_id: int) -> None:
        if self.client.annotation(annotation_id) is not None:  # still there: a forged webhook changes nothing
            self._count_skip(annotation_id, _Skipped("not_found", "Label Studio still has it; deletion ignored"))
            return
        if self.stream.remove(annotation_id):
            self.metrics.label_studio_annotations.labels(outcome="removed").inc()

    def _start_training(self, project_id: int) -> None:
        if self.client.project(project_id) is None:
            self._count_skip(project_id, _Skipped("not_found", f"Label Studio has no project {project_id}"))
            return
        self._configs.pop(project_id, None)  # a deliberate retrain reads the label config afresh
        control = self._control(project_id)
        items = []
        for task in self.client.annotated_tasks(project_id):
            kept = [a for a in task["annotations"] if not a.get("was_cancelled")]
            if not kept:
                continue
            annotation = max(kept, key=lambda a: (str(a.get("updated_at") or ""), int(a["id"])))
            try:
                items.append(self._streamed(annotation, task, control))
            except _Skipped as skipped:
                self._count_skip(int(annotation["id"]), skipped)
        jobs = self.stream.add_all(items)
        self.metrics.label_studio_annotations.labels(outcome="streamed").inc(len(items))
        logger.info("Label Studio project %d: Start Training pulled %d annotated images, %d jobs queued now",
                    project_id, len(items), len(jobs))

    # ---- one annotation -> one training image

    def _control(self, project_id: int) -> RectangleControl:
        cached = self._configs.get(project_id)
        if cached is not None and time.monotonic() - cached[1] < CONFIG_TTL_S:
            return cached[0]
        project = self.client.project(project_id)
        if project is None:
            raise _Skipped("not_found", f"Label Studio has no project {project_id}")
        try:
            control = parse_label_config(project.get("label_config") or "", self._class_names,
                                         self.settings.label_studio_label_map)
        except LabelConfigError as error:
            raise _Skipped("failed", f"project {project_id}: {error}") from None
        self._configs[project_id] = (control, time.monotonic())
        return control

    def _streamed(self, annotation: Mapping, task: Mapping, control: RectangleControl) -> StreamedImage:
        """The training image of an annotation as Label Studio returned it (with its task). Raises _Skipped."""
        if annotation.get("was_cancelled"):
            raise _Skipped("cancelled", "the annotator skipped the task")
        try:
            data = self.client.image(task_image_url(task, control))
            image = decode_image_bytes(data, self.settings.max_image_pixels)  # [3, H, W]
        except (LabelStudioError, ImageError, ValueError) as error:
            raise _Skipped("failed", f"task {task.get('id')}: {error}") from None
        boxes = annotation_boxes(annotation.get("result") or [], control, (image.shape[1], image.shape[2]))
        for reason, count in boxes.skipped.items():
            self.metrics.label_studio_skipped_boxes.labels(reason=reason).inc(count)
        if not boxes.boxes:
            raise _Skipped("no_boxes", f"task {task.get('id')}: no box to train on ({dict(boxes.skipped)} skipped)")
        labelled = control.labelled_classes
        sample = Sample(image, torch.tensor(boxes.boxes, dtype=torch.float32),
                        torch.tensor(boxes.labels, dtype=torch.long), torch.zeros(len(boxes.labels), dtype=torch.bool),
                        tuple(labelled) if len(labelled) < len(self._class_names) else None)
        origin = LabelStudioAnnotation(project_id=int(task["project"]), task_id=int(task["id"]),
                                       annotation_id=int(annotation["id"]))
        return StreamedImage(origin, sample, data)

    def _count_skip(self, object_id: int, skipped: _Skipped) -> None:
        self.metrics.label_studio_annotations.labels(outcome=skipped.outcome).inc()
        log = logger.warning if skipped.outcome == "failed" else logger.info
        log("Label Studio annotation %d not trained on (%s): %s", object_id, skipped.outcome, skipped)


def _object_id(payload: Mapping, key: str) -> int:
    """`payload[key]["id"]` as an int; InvalidValue naming the field when absent."""
    value = payload.get(key)
    object_id = value.get("id") if isinstance(value, Mapping) else None
    if isinstance(object_id, bool) or not isinstance(object_id, int):
        raise InvalidValue(f"{key}.id", f"a {payload.get('action')} webhook names the {key} by its integer id")
    return object_id
