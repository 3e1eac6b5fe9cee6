"""The dynamic batching rules: a lone request to an idle worker runs at once; what queues while the worker
is busy gathers until full or the deadline; one key per batch, cancelled requests dropped, bounded capacity.
`plan_batch` on a synthetic clock; `BatchQueue` with real threads."""

from __future__ import annotations

import threading
import time

import pytest

from app.serving.batching import BatchPolicy, BatchQueue, Pending, QueueFull, plan_batch

POLICY = BatchPolicy(max_images=8, max_delay_s=0.010, capacity=16)


def pending(images: int, key: int = 1, at: float = 0.0, name: str = "") -> Pending:
    return Pending(name, images, key, at)


def names(batch) -> list[str]:
    return [p.payload for p in batch]


def test_waits_for_company_until_the_deadline_of_the_oldest_request():
    queued = [pending(2, at=0.0, name="a"), pending(1, at=0.004, name="b")]
    assert plan_batch(queued, POLICY, now=0.006) == pytest.approx(0.004)  # the oldest has waited 6 of 10 ms
    assert names(plan_batch(queued, POLICY, now=0.010)) == ["a", "b"]


def test_dispatches_as_soon_as_the_batch_is_full():
    queued = [pending(4, name="a"), pending(4, name="b"), pending(1, name="c")]
    assert names(plan_batch(queued, POLICY, now=0.0)) == ["a", "b"]


def test_never_passes_max_images_and_keeps_arrival_order():
    # c does not fit after a and b: the batch stops there (d, which would fit, waits: no overtaking)
    queued = [pending(3, name="a"), pending(3, name="b"), pending(3, name="c"), pending(1, name="d")]
    assert names(plan_batch(queued, POLICY, now=0.0)) == ["a", "b"]


def test_one_key_per_batch_and_a_newer_key_behind_dispatches_at_once():
    queued = [pending(1, key=3, name="a"), pending(2, key=4, name="b"), pending(1, key=3, name="c")]
    batch = plan_batch(queued, POLICY, now=0.0)  # no wait: a newer version is queued behind
    assert names(batch) == ["a", "c"]
    assert {p.key for p in batch} == {3}


def test_a_request_that_found_the_worker_idle_runs_at_once_with_what_queued_behind_it():
    queued = [Pending("a", 1, 1, 0.0, immediate=True), pending(1, at=0.0001, name="b")]
    assert names(plan_batch(queued, POLICY, now=0.0001)) == ["a", "b"]  # not 10 ms later


def test_zero_delay_runs_every_request_on_its_own():
    off = BatchPolicy(max_images=8, max_delay_s=0.0, capacity=16)
    queued = [pending(1, name="a"), pending(1, name="b")]
    assert names(plan_batch(queued, off, now=0.0)) == ["a"]


def test_policy_rejects_bad_limits_naming_the_value():
    with pytest.raises(ValueError, match="max_images must be >= 1, got 0"):
        BatchPolicy(max_images=0)
    with pytest.raises(ValueError, match="max_delay_s must be >= 0, got -1"):
        BatchPolicy(max_delay_s=-1)
    with pytest.raises(ValueError, match="capacity must be >= max_images=8, got 4"):
        BatchPolicy(max_images=8, capacity=4)


def test_queue_is_bounded_in_images_and_cancel_frees_capacity():
    queue = BatchQueue(POLICY)
    first = queue.put("a", 8, key=1)
    queue.put("b", 8, key=1)
    with pytest.raises(QueueFull):
        queue.put("c", 1, key=1)
    assert queue.cancel(first) is True
    assert queue.queued_images == 8
    queue.put("c", 1, key=1)
    with pytest.raises(ValueError, match=r"images must be in \[1, 8\], got 9"):
        queue.put("d", 9, key=1)


def test_cancelled_request_is_never_handed_out():
    queue = BatchQueue(POLICY)
    gone = queue.put("gone", 2, key=1)
    queue.put("kept", 2, key=1)
    queue.cancel(gone)
    assert names(queue.next_batch(timeout=1.0)) == ["kept"]
    assert gone.cancelled
    assert queue.cancel(gone) is False  # no longer queued


def test_concurrent_puts_within_the_delay_share_one_batch():
    queue = BatchQueue(BatchPolicy(max_images=32, max_delay_s=0.5, capacity=64))
    barrier = threading.Barrier(6)

    def client(k: int) -> None:
        barrier.wait()
        queue.put(f"r{k}", 1, key=1)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batch = queue.next_batch(timeout=2.0)  # all six arrived well within the 0.5 s delay
    assert sorted(names(batch)) == [f"r{k}" for k in range(6)]
    assert queue.queued_images == 0


def test_next_batch_returns_at_the_deadline_without_a_full_batch():
    queue = BatchQueue(BatchPolicy(max_images=32, max_delay_s=0.05, capacity=64))
    queue.put("a", 1, key=1)
    start = time.monotonic()
    assert names(queue.next_batch(timeout=5.0)) == ["a"]
    assert 0.04 <= time.monotonic() - start < 2.0


def test_an_arrival_that_fills_the_batch_wakes_the_worker_before_the_deadline():
    queue = BatchQueue(BatchPolicy(max_images=2, max_delay_s=30.0, capacity=8))
    queue.put("a", 1, key=1)
    threading.Timer(0.05, lambda: queue.put("b", 1, key=1)).start()
    start = time.monotonic()
    assert names(queue.next_batch(timeout=10.0)) == ["a", "b"]
    assert time.monotonic() - start < 5.0  # far before the 30 s delay


def test_timeout_and_close():
    queue = BatchQueue(POLICY)
    assert queue.next_batch(timeout=0.01) == []
    queue.put("a", 1, key=1)
    queue.close()
    assert names(queue.next_batch()) == ["a"]  # drained without waiting for the delay
    assert queue.next_batch() == []
    with pytest.raises(QueueFull):
        queue.put("b", 1, key=1)


def waiting_worker(queue: BatchQueue) -> tuple[threading.Thread, list]:
    """A worker thread blocked in `next_batch` (it has nothing to do), and the list its batch lands in."""
    taken: list = []
    worker = threading.Thread(target=lambda: taken.append((queue.next_batch(timeout=20.0), time.monotonic())),
                              daemon=True)
    worker.start()
    while not queue.worker_idle:
        time.sleep(0.001)
    return worker, taken


def test_a_lone_request_to_an_idle_worker_does_not_wait_the_delay():
    queue = BatchQueue(BatchPolicy(max_images=8, max_delay_s=30.0, capacity=16))
    worker, taken = waiting_worker(queue)
    request = queue.put("alone", 1, key=1)
    worker.join(5.0)  # far below the 30 s delay
    assert not worker.is_alive(), "the lone request waited for company"
    (batch, handed_out_at), = taken
    assert names(batch) == ["alone"] and request.immediate
    assert handed_out_at - request.enqueued_at < 1.0  # its queue wait: about nothing
    assert not queue.worker_idle


def test_requests_that_queue_while_the_worker_is_busy_form_the_next_batch():
    now = [0.0]
    queue = BatchQueue(BatchPolicy(max_images=3, max_delay_s=0.2, capacity=16), clock=lambda: now[0])
    worker, taken = waiting_worker(queue)
    queue.put("first", 1, key=1)
    worker.join(5.0)
    assert names(taken[0][0]) == ["first"]
    # the worker runs "first": nobody waits in next_batch, so arrivals queue for company
    queued = [queue.put(name, 1, key=1) for name in ("b", "c")]
    assert not any(p.immediate for p in queued)
    assert queue.next_batch(timeout=0.0) == []  # two of three images, 0 of 200 ms waited: not due
    now[0] = 0.2
    assert names(queue.next_batch(timeout=0.0)) == ["b", "c"]  # due at the oldest one's deadline
    for name in ("d", "e", "f"):
        queue.put(name, 1, key=1)
    assert names(queue.next_batch(timeout=0.0)) == ["d", "e", "f"]  # full: due at once


def test_an_arrival_behind_a_batch_that_waits_for_company_joins_it():
    queue = BatchQueue(BatchPolicy(max_images=2, max_delay_s=30.0, capacity=8))
    queue.put("a", 1, key=1)  # queued while the worker was busy: waits up to 30 s for company
    worker, taken = waiting_worker(queue)
    late = queue.put("b", 1, key=1)  # the worker is idle, but the queue is not empty
    worker.join(5.0)
    assert not late.immediate
    assert names(taken[0][0]) == ["a", "b"]  # one batch, dispatched when full
