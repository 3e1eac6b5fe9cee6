"""The ML backend's parts as the routes use them: the Label Studio client, the annotation stream and its
webhook intake (trainer only), predictions for Label Studio's tasks and the names of model versions.

`model_version` names a published version (`version_name`: "<model>-v<version>"), so Label Studio's
`/setup` call before each predict batch learns the newest one and predicts again the tasks that lack a
prediction of it; while the project's selected model version is the ML backend (Label Studio's default
on connecting one), the labelling UI pre-fills the newest version's predictions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from anyio import to_thread
from torch import Tensor

from app.core.errors import Conflict, InvalidValue
from app.core.metrics import Metrics
from app.core.settings import Settings
from app.labelstudio.client import LabelStudioClient, LabelStudioError, decode_data_url
from app.labelstudio.intake import WebhookIntake
from app.labelstudio.protocol import (
    LabelConfigError,
    RectangleControl,
    detections_to_results,
    parse_label_config,
    task_image_url,
    task_score,
)
from app.online.annotation_stream import AnnotationStream
from app.online.worker import FinetuneWorker
from app.serving.detection import detect_images
from app.serving.inference import InferenceWorker, WaitForDisconnect
from app.serving.model_host import ModelHost
from ssd_core.data.images import ImageError, decode_image_bytes
from ssd_core.storage.checkpoint import CheckpointStore

logger = logging.getLogger(__name__)

PREDICT_ROUTE = "/labelstudio/predict"
NOT_CONFIGURED = ("Label Studio is not configured: set SSD_LABEL_STUDIO_URL (Label Studio's URL as this service "
                  "reaches it) and SSD_LABEL_STUDIO_API_KEY (a legacy token or personal access token)")


def version_name(settings: Settings, version: int) -> str:
    """The `model_version` Label Studio sees for a published version."""
    return f"{settings.model}-v{version}"


@dataclass
class LabelStudioBackend:
    """`client` is None without SSD_LABEL_STUDIO_URL and SSD_LABEL_STUDIO_API_KEY; `stream` and `intake` are None
    where no trainer runs (a server replica) or without a client."""

    settings: Settings
    metrics: Metrics
    client: LabelStudioClient | None
    stream: AnnotationStream | None = None
    intake: WebhookIntake | None = None

    def stop(self, timeout: float) -> None:
        if self.intake is not None:
            self.intake.stop(timeout)
        if self.client is not None:
            self.client.close()

    def require_client(self) -> LabelStudioClient:
        if self.client is None:
            raise Conflict("label_studio_not_configured", NOT_CONFIGURED)
        return self.client

    def require_intake(self) -> WebhookIntake:
        self.require_client()
        if self.intake is None:
            raise Conflict("wrong_role", "this replica runs no trainer: send Label Studio's webhooks to the trainer")
        return self.intake

    def control(self, config: object, field: str) -> RectangleControl:
        """The label config's RectangleLabels; InvalidValue naming `field` (and the unknown labels)."""
        if not isinstance(config, str) or not config.strip():
            raise InvalidValue(field, "Label Studio's label config (XML) is missing")
        try:
            return parse_label_config(config, self.settings.object_class_names(),
                                      self.settings.label_studio_label_map)
        except LabelConfigError as error:
            raise InvalidValue(field, str(error)) from None

    def versions(self, host: ModelHost, store: CheckpointStore | None) -> list[str]:
        """The served version and the saved ones, newest first, as `model_version` names."""
        numbers = {host.current.version} | ({info.version for info in store.versions()} if store else set())
        return [version_name(self.settings, number) for number in sorted(numbers, reverse=True)]

    async def predict(
        self, tasks: Sequence[Mapping], control: RectangleControl, client_gone: WaitForDisconnect, host: ModelHost,
        inference: InferenceWorker,
    ) -> list[dict]:
        """One prediction per task, in order: `{"result": [rectangles], "score", "model_version"}`.

        Every image is fetched from Label Studio (or decoded from a data URL) concurrently, then run in
        forward passes of at most SSD_MAX_BATCH_IMAGES images, all by the version served when the request
        began. A task whose image cannot be fetched or decoded gets an empty result (logged, counted)."""
        images = await asyncio.gather(*(to_thread.run_sync(self._task_image, task, control) for task in tasks))
        served = host.current
        name = version_name(self.settings, served.version)
        found: dict[int, list[dict]] = {}
        ready = [(k, image) for k, image in enumerate(images) if image is not None]
        chunk = self.settings.max_batch_images
        for start in range(0, len(ready), chunk):
            part = ready[start : start + chunk]
            detections = await detect_images(client_gone, [image for _, image in part], None, None, PREDICT_ROUTE,
                                             served, host, inference, self.settings)
            for (k, image), found_k in zip(part, detections, strict=True):
                found[k] = detections_to_results(found_k.boxes.tolist(), found_k.labels.tolist(),
                                                 found_k.scores.tolist(), (image.shape[1], image.shape[2]), control)
        self.metrics.label_studio_predicted_tasks.labels(outcome="predicted").inc(len(found))
        self.metrics.label_studio_predicted_tasks.labels(outcome="image_failed").inc(len(tasks) - len(found))
        self.metrics.images_processed.labels(route=PREDICT_ROUTE).inc(len(found))
        return [{"result": found.get(k, []), "score": task_score(found.get(k, [])), "model_version": name}
                for k in range(len(tasks))]

    def _task_image(self, task: Mapping, control: RectangleControl) -> Tensor | None:
        """The task's image [3, H, W] uint8, or None (logged) when it cannot be had."""
        try:
            url = task_image_url(task, control)
            if self.client is not None:
                data = self.client.image(url)
            elif url.startswith("data:"):
                data = decode_data_url(url)
            else:
                raise LabelStudioError(f"cannot fetch {url!r}: {NOT_CONFIGURED}")
            return decode_image_bytes(data, self.settings.max_image_pixels)
        except (LabelStudioError, ImageError, ValueError) as error:
            logger.warning("Label Studio task %s: no prediction: %s", task.get("id"), error)
            return None


def start_label_studio(settings: Settings, metrics: Metrics, worker: FinetuneWorker | None) -> LabelStudioBackend:
    """The backend's parts for this replica; with a trainer (`worker`) and a configured Label Studio the
    annotation stream and its intake's thread are started."""
    client = None
    if settings.label_studio_url is not None and settings.label_studio_api_key is not None:
        client = LabelStudioClient(str(settings.label_studio_url), settings.label_studio_api_key.get_secret_value(),
                                   timeout_s=settings.label_studio_timeout_s, max_bytes=settings.max_body_bytes)
    backend = LabelStudioBackend(settings, metrics, client)
    if client is not None and worker is not None:
        backend.stream = AnnotationStream(worker, settings, metrics)
        backend.intake = WebhookIntake(client, backend.stream, settings, metrics)
        backend.intake.start()
    return backend
