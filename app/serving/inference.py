"""The inference worker: one thread runs every forward pass of the hosted model, batching concurrent
requests by the rules of `app.serving.batching` (which requests share a forward is decided there).

Routes prepare their images (decoded, checked and resized to S x S in their own worker thread), then
`await forward(...)` (the raw outputs), or queue them for their detections with `queue_request(...)` (from that
worker thread, so the forward can start without a return to the event loop first) and
`await queued_detections(...)`. The images are queued under the model version the request was accepted with,
the worker concatenates a batch into one [N, 3, S, S] forward and hands each request its rows; the detections
of every detection request in a batch are decoded and suppressed at once (`detect_with_spec` over the batch,
each image with its request's options), on a CPU by a second thread while the next batch's forward runs. A
request whose client disconnects while it waits is cancelled and never computed; a full queue is
`Unavailable` with a retry delay.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from app.core.errors import ClientGone, Unavailable
from app.core.metrics import Metrics
from app.core.settings import Settings
from app.serving.batching import BatchPolicy, BatchQueue, Pending, QueueFull
from app.serving.model_host import ModelHost, ModelVersion
from ssd_core.models.postprocess import Detections, detect_with_spec

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class DetectionOptions:
    """How a request's detections are decoded: its score threshold and detections per image, the NMS IoU,
    and each image's (height, width) (boxes come back in its pixels)."""

    score_threshold: float
    max_detections: int
    nms_iou: float
    image_sizes: list[tuple[int, int]]


@dataclass(frozen=True)
class _Work:
    images: Tensor  # [n, 3, S, S] normalised
    served: ModelVersion
    route: str
    result: Future  # -> (loc [n, P, 4], conf [n, P, C]), or list[Detections] (n) when `detection` is set
    detection: DetectionOptions | None = None


def batch_policy(settings: Settings) -> BatchPolicy:
    return BatchPolicy(settings.max_batch_images, settings.max_batch_delay_ms / 1000, settings.inference_queue_size)


class InferenceWorker:
    """Owns the batch queue and the thread that empties it.

    Args:
        host: runs the forward passes (`ModelHost.predict`).
        policy: batch limits and queue capacity.
        metrics: `ssd_inference_*` are recorded per route.
    """

    def __init__(self, host: ModelHost, policy: BatchPolicy, metrics: Metrics) -> None:
        self.host = host
        self.metrics = metrics
        self.queue = BatchQueue(policy)
        # a batch's detections are decoded beside the next batch's forward pass: on a CPU the forward is the
        # bottleneck of many clients and the other cores would idle; on a GPU they run on the device, in line
        self._detector = ThreadPoolExecutor(1, "detect") if host.device.type == "cpu" else None
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def submit(
        self, images: Tensor, served: ModelVersion, route: str, detection: DetectionOptions | None = None
    ) -> list[tuple[Pending, Future]]:
        """Queue `images` [B, 3, S, S] for version `served`, in parts of at most `max_images`; with `detection`
        each part's result is its detections.

        Raises:
            QueueFull: no room for all parts (none of them stays queued).
        """
        parts: list[tuple[Pending, Future]] = []
        step = self.queue.policy.max_images
        try:
            for start in range(0, len(images), step):
                chunk = images[start : start + step]
                part = None if detection is None else DetectionOptions(
                    detection.score_threshold, detection.max_detections, detection.nms_iou,
                    detection.image_sizes[start : start + step])
                work = _Work(chunk, served, route, Future(), part)
                parts.append((self.queue.put(work, len(chunk), served.version), work.result))
        except QueueFull:
            self.cancel(parts)
            raise
        self.metrics.inference_queued_images.set(self.queue.queued_images)
        return parts

    def cancel(self, parts: list[tuple[Pending, Future]]) -> None:
        """Drop parts still queued (their client has gone); parts already running finish unread."""
        for pending, result in parts:
            if self.queue.cancel(pending):
                self.metrics.inference_cancelled.labels(route=pending.payload.route).inc(pending.images)
            result.cancel()
        self.metrics.inference_queued_images.set(self.queue.queued_images)

    def stop(self, timeout: float) -> None:
        """Refuse new work, finish what is queued, join the thread."""
        self.queue.close()
        self._thread.join(timeout)
        if self._detector is not None:
            self._detector.shutdown(wait=True)

    def _run(self) -> None:
        while True:
            batch = self.queue.next_batch()
            if not batch:
                return  # closed and drained
            self.metrics.inference_queued_images.set(self.queue.queued_images)
            live = [p for p in batch if p.payload.result.set_running_or_notify_cancel()]
            if live:
                self._forward(live)

    def _forward(self, batch: list[Pending]) -> None:
        started = time.monotonic()
        for pending in batch:
            self.metrics.inference_queue_wait.labels(route=pending.payload.route).observe(started - pending.enqueued_at)
        works: list[_Work] = [p.payload for p in batch]
        served = works[0].served  # one version per batch (the queue's key)
        try:
            images = works[0].images if len(works) == 1 else torch.cat([w.images for w in works])  # [N, 3, S, S]
            loc, conf, priors = self.host.predict(images, served)
        except Exception as error:  # every waiting request gets the failure; the worker lives on
            logger.exception("forward pass of %d images failed", sum(p.images for p in batch))
            for work in works:
                work.result.set_exception(error)
            return
        elapsed = time.monotonic() - started
        backend = served.backend
        for route in dict.fromkeys(w.route for w in works):
            self.metrics.inference_batch_size.labels(route=route).observe(len(images))
            self.metrics.inference_compute.labels(route=route, backend=backend).observe(elapsed)
        rows, start = [], 0
        for work in works:
            rows.append(slice(start, start + len(work.images)))
            start += len(work.images)
        for work, part in zip(works, rows, strict=True):
            if work.detection is None:
                work.result.set_result((loc[part], conf[part]))  # [n, P, 4], [n, P, C]
        detecting = [(work, part) for work, part in zip(works, rows, strict=True) if work.detection is not None]
        if not detecting:
            return
        if len(detecting) < len(works):  # raw outputs' rows are in the batch too
            index = torch.cat([torch.arange(part.start, part.stop) for _, part in detecting]).to(loc.device)
            loc, conf = loc[index], conf[index]
        if self._detector is not None:
            self._detector.submit(self._detect, [work for work, _ in detecting], loc, conf, priors)
        else:
            self._detect([work for work, _ in detecting], loc, conf, priors)

    def _detect(self, works: list[_Work], loc: Tensor, conf: Tensor, priors: Tensor) -> None:
        """The detections of the detection requests `works` (their rows of the batch: `loc`, `conf`), in one
        `detect_with_spec` call."""
        try:
            with torch.inference_mode():
                found = detect_with_spec(
                    self.host.spec, loc, conf, priors, nms_iou=works[0].detection.nms_iou,
                    score_threshold=[w.detection.score_threshold for w in works for _ in range(len(w.images))],
                    max_detections=[w.detection.max_detections for w in works for _ in range(len(w.images))],
                    image_sizes=[size for w in works for size in w.detection.image_sizes],
                )
        except Exception as error:
            logger.exception("post-processing of %d images failed", len(loc))
            for work in works:
                work.result.set_exception(error)
            return
        if loc.device.type != "cpu":
            found = [Detections(d.boxes.cpu(), d.scores.cpu(), d.labels.cpu()) for d in found]
        start = 0
        for work in works:
            work.result.set_result(found[start : start + len(work.images)])
            start += len(work.images)


WaitForDisconnect = Callable[[], Awaitable[object]]  # returns once the request's client has disconnected


Queued = list[tuple[Pending, Future]]  # a request's parts in the batch queue, awaited with `queued_results`


def queue_request(
    worker: InferenceWorker, images: Tensor, served: ModelVersion, route: str, detection: DetectionOptions | None = None
) -> Queued:
    """Queue `images` [B, 3, S, S] for version `served` (with `detection`, for their detections); callable from any
    thread, so a request's worker-thread hop can queue its images without going back to the event loop first.

    Raises:
        Unavailable: `queue_full` (with `retry_after_s`) when the queue is full.
    """
    try:
        return worker.submit(images, served, route, detection)
    except QueueFull as error:
        raise Unavailable("queue_full", f"inference queue is full ({error}); retry later",
                          retry_after_s=RETRY_AFTER_S) from None


async def queued_detections(client_gone: WaitForDisconnect, worker: InferenceWorker, parts: Queued) -> list[Detections]:
    """The detections of each image of a request queued with `detection` options (`queue_request`), decoded on
    the inference side with the rest of its batch's.

    Returns:
        per image, boxes (Tensor[K, 4]) in (x1, y1, x2, y2) pixels of that image, scores [K], labels [K] (CPU).

    Raises:
        ClientGone: the client went away before the result (its parts still queued are dropped).
    """
    return [found for part in await queued_results(client_gone, worker, parts) for found in part]


async def forward(
    client_gone: WaitForDisconnect, worker: InferenceWorker, images: Tensor, served: ModelVersion, route: str
) -> tuple[Tensor, Tensor]:
    """Run version `served` on `images` [B, 3, S, S] through the batcher.

    Args:
        client_gone: awaited alongside the result; when it returns first the request is abandoned.

    Returns:
        loc (Tensor[B, P, 4]), conf (Tensor[B, P, C]) on the host's device.

    Raises:
        Unavailable: `queue_full` (with `retry_after_s`) when the queue is full.
        ClientGone: the client went away before the result.
    """
    outputs = await queued_results(client_gone, worker, queue_request(worker, images, served, route))
    if len(outputs) == 1:
        return outputs[0]
    return torch.cat([loc for loc, _ in outputs]), torch.cat([conf for _, conf in outputs])


async def queued_results(client_gone: WaitForDisconnect, worker: InferenceWorker, parts: Queued) -> list:
    """The result of each queued part of a request, in order."""
    results = asyncio.gather(*(asyncio.wrap_future(result) for _, result in parts))
    gone = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled: nothing stays queued for nobody
        gone.cancel()
        abandoned = not results.done()
        if abandoned:
            worker.cancel(parts)
            results.cancel()
            results.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
    if abandoned:
        raise ClientGone("client_closed_request", "the client closed the connection before the result")
    return results.result()
