"""The inference worker: one thread runs every forward pass of the hosted model, batching concurrent
requests by the rules of `app.serving.batching` (which requests share a forward is decided there).

Routes prepare their images (decoded, checked and resized to S x S in their own worker thread), then
`await forward(...)`: the images are queued under the model version the request was accepted with,
the worker concatenates a batch into one [N, 3, S, S] forward and hands each request its rows. A
request whose client disconnects while it waits is cancelled and never computed; a full queue is
`Unavailable` with a retry delay.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor

from app.core.errors import ClientGone, Unavailable
from app.core.metrics import Metrics
from app.core.settings import Settings
from app.serving.batching import BatchPolicy, BatchQueue, Pending, QueueFull
from app.serving.model_host import ModelHost, ModelVersion

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class _Work:
    images: Tensor  # [n, 3, S, S] normalised
    served: ModelVersion
    route: str
    result: Future  # -> (loc [n, P, 4], conf [n, P, C])


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
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def submit(self, images: Tensor, served: ModelVersion, route: str) -> list[tuple[Pending, Future]]:
        """Queue `images` [B, 3, S, S] for version `served`, in parts of at most `max_images`.

        Raises:
            QueueFull: no room for all parts (none of them stays queued).
        """
        parts: list[tuple[Pending, Future]] = []
        step = self.queue.policy.max_images
        try:
            for start in range(0, len(images), step):
                chunk = images[start : start + step]
                work = _Work(chunk, served, route, Future())
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
        try:
            images = works[0].images if len(works) == 1 else torch.cat([w.images for w in works])  # [N, 3, S, S]
            loc, conf, _ = self.host.predict(images, works[0].served)  # one version per batch (the queue's key)
        except Exception as error:  # every waiting request gets the failure; the worker lives on
            logger.exception("forward pass of %d images failed", sum(p.images for p in batch))
            for work in works:
                work.result.set_exception(error)
            return
        elapsed = time.monotonic() - started
        for route in dict.fromkeys(w.route for w in works):
            self.metrics.inference_batch_size.labels(route=route).observe(len(images))
            self.metrics.inference_compute.labels(route=route).observe(elapsed)
        start = 0
        for work in works:
            rows = slice(start, start + len(work.images))
            work.result.set_result((loc[rows], conf[rows]))  # [n, P, 4], [n, P, C]
            start = rows.stop


WaitForDisconnect = Callable[[], Awaitable[object]]  # returns once the request's client has disconnected


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
    try:
        parts = worker.submit(images, served, route)
    except QueueFull as error:
        raise Unavailable("queue_full", f"inference queue is full ({error}); retry later",
                          retry_after_s=RETRY_AFTER_S) from None
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
    outputs = results.result()
    if len(outputs) == 1:
        return outputs[0]
    return torch.cat([loc for loc, _ in outputs]), torch.cat([conf for _, conf in outputs])
