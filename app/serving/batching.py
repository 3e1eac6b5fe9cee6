"""Dynamic batching rules: which queued requests run together as one forward pass.

Framework-free (threads and a clock only): the service's inference worker (`app.serving.inference`) calls
`BatchQueue.next_batch` in a loop; request handlers `put` and `cancel`. The rules:

* a batch holds at most `max_images` images, and only requests of one key (the model version they
  were accepted under), taken oldest first; a request never splits across batches;
* a request that finds the worker idle (waiting in `next_batch`) and nothing else queued runs at once:
  a lone request never waits for company that is not coming;
* otherwise (it arrived while a forward pass ran, or behind other queued requests) a batch is dispatched
  when it is full, when a request of another key waits behind it (no more of its key can arrive once the
  version has moved on), or `max_delay_s` after its oldest request was queued. So what queued during one
  forward pass forms the next one (adaptive batching), and the delay only bounds how long a batch that
  is not full yet waits for more; `max_delay_s = 0` turns batching off: every request runs on its own, in
  arrival order;
* cancelled requests (their client has gone) leave the queue at once and free their capacity;
* at most `capacity` images wait; `put` beyond raises `QueueFull`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchPolicy", "BatchQueue", "Pending", "QueueFull", "plan_batch"]


@dataclass(frozen=True)
class BatchPolicy:
    """Limits of the dynamic batcher.

    Attributes:
        max_images: images in one forward pass (>= 1).
        max_delay_s: longest wait of the oldest request for more company when it arrived while the worker
            was busy (0: no batching across requests).
        capacity: images that may wait in the queue (>= max_images).
    """

    max_images: int = 32
    max_delay_s: float = 0.005
    capacity: int = 128

    def __post_init__(self) -> None:
        if self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")
        if self.max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {self.max_delay_s}")
        if self.capacity < self.max_images:
            raise ValueError(f"capacity must be >= max_images={self.max_images}, got {self.capacity}")


class QueueFull(Exception):
    """The queue holds `capacity` images already; the caller should answer 503 and retry later."""


@dataclass(eq=False)
class Pending:
    """One queued request.

    Attributes:
        payload: whatever the worker needs to run it (opaque here).
        images: its number of images (1 <= images <= max_images).
        key: requests of different keys never share a batch (the model version).
        enqueued_at: the queue's clock when it was put.
        immediate: it was put while a worker waited in `next_batch` and nothing else was queued: due at once.
        cancelled: set by `BatchQueue.cancel`.
    """

    payload: Any
    images: int
    key: Hashable
    enqueued_at: float
    immediate: bool = False
    cancelled: bool = field(default=False)


def plan_batch(queued: Sequence[Pending], policy: BatchPolicy, now: float) -> list[Pending] | float:
    """Decide the next batch from the queue (oldest first), without side effects.

    Args:
        queued: the waiting, not cancelled requests in arrival order (non-empty).
        now: the current time on the clock that stamped `enqueued_at`.

    Returns:
        the batch to run now, or the seconds to wait before asking again (new arrivals may decide sooner).
    """
    head = queued[0]
    if policy.max_delay_s == 0:
        return [head]
    batch, total, behind = [], 0, False
    for pending in queued:
        if pending.key != head.key:
            behind = True
            continue
        if total + pending.images > policy.max_images:
            return batch  # full: the next one of this key does not fit
        batch.append(pending)
        total += pending.images
    waited = now - head.enqueued_at
    if head.immediate or total == policy.max_images or behind or waited >= policy.max_delay_s:
        return batch
    return policy.max_delay_s - waited


class BatchQueue:
    """A bounded, thread-safe queue that hands out batches by the rules of `plan_batch`.

    Args:
        policy: the limits.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, policy: BatchPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._queued: deque[Pending] = deque()
        self._images = 0
        self._waiting = 0  # workers inside `next_batch`: idle, not running a forward pass
        self._closed = False
        self._changed = threading.Condition()

    @property
    def queued_images(self) -> int:
        """Images waiting now."""
        return self._images

    @property
    def worker_idle(self) -> bool:
        """Whether a worker waits in `next_batch` (it is not running a forward pass)."""
        return self._waiting > 0

    def put(self, payload: Any, images: int, key: Hashable) -> Pending:
        """Queue one request of `images` images.

        Raises:
            ValueError: `images` outside [1, max_images].
            QueueFull: the queue would pass `capacity` images, or it is closed.
        """
        if not 1 <= images <= self.policy.max_images:
            raise ValueError(f"images must be in [1, {self.policy.max_images}], got {images}")
        with self._changed:
            if self._closed:
                raise QueueFull("the queue is closed")
            if self._images + images > self.policy.capacity:
                raise QueueFull(f"{self._images} images queued, capacity {self.policy.capacity}")
            pending = Pending(payload, images, key, self._clock(), immediate=self.worker_idle and not self._queued)
            self._queued.append(pending)
            self._images += images
            self._changed.notify_all()
        return pending

    def cancel(self, pending: Pending) -> bool:
        """Drop a request that has not been handed out; returns whether it was still queued."""
        with self._changed:
            pending.cancelled = True
            try:
                self._queued.remove(pending)
            except ValueError:
                return False  # already in a batch (or cancelled twice)
            self._images -= pending.images
            self._changed.notify_all()
            return True

    def next_batch(self, timeout: float | None = None) -> list[Pending]:
        """Block until a batch is due and remove it from the queue.

        Args:
            timeout: give up after this many seconds (None: wait for ever).

        Returns:
            the batch (oldest first); empty after `timeout` or once the queue is closed and empty.
        """
        deadline = None if timeout is None else self._clock() + timeout
        with self._changed:
            self._waiting += 1
            try:
                return self._wait_for_batch(deadline)
            finally:
                self._waiting -= 1

    def _wait_for_batch(self, deadline: float | None) -> list[Pending]:
        """`next_batch`'s wait, with the lock held."""
        while True:
            wait = None if deadline is None else deadline - self._clock()
            if self._queued:
                # once closed nothing more arrives: whatever is queued is due now
                now = float("inf") if self._closed else self._clock()
                plan = plan_batch(self._queued, self.policy, now)
                if isinstance(plan, list):
                    return self._take(plan)
                wait = plan if wait is None else min(wait, plan)
            elif self._closed:
                return []
            if wait is not None and wait <= 0:
                return []
            self._changed.wait(wait)

    def _take(self, batch: list[Pending]) -> list[Pending]:
        for pending in batch:
            self._queued.remove(pending)
        self._images -= sum(p.images for p in batch)
        return batch

    def close(self) -> None:
        """Refuse new requests; `next_batch` drains what is queued without waiting, then returns []."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
