"""Replay: class balance over many draws, draw rules, the memory's bounds, lossless round trip and
persistence across a restart and a kill -9."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
from collections import Counter

import pytest
import torch

from ssd_core.data.datasets import Sample
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.online.replay import NO_OBJECT, ReplayMemory, balanced_draw, class_counts

RECTANGLE, ELLIPSE, TRIANGLE = 0, 1, 2


def _share_per_class(labels_per_image, draws: list[int]) -> dict[int, float]:
    """Fraction of the drawn images that contain each class."""
    counts = Counter(c for i in draws for c in set(labels_per_image[i]))
    return {c: n / len(draws) for c, n in counts.items()}


def test_a_rare_class_is_replayed_as_often_as_a_common_one():
    memory = [[RECTANGLE]] * 1000 + [[ELLIPSE, ELLIPSE]] * 50 + [[TRIANGLE]] * 10
    rng = random.Random(0)
    draws = [i for _ in range(3000) for i in balanced_draw(memory, 4, rng)]
    share = _share_per_class(memory, draws)
    for label in (RECTANGLE, ELLIPSE, TRIANGLE):
        assert share[label] == pytest.approx(1 / 3, abs=0.03), share
    uniform = _share_per_class(memory, [rng.randrange(len(memory)) for _ in range(len(draws))])
    assert uniform[TRIANGLE] < 0.02  # what class balance fixes


def test_images_with_several_classes_and_without_objects():
    memory = [[RECTANGLE, TRIANGLE]] * 20 + [[RECTANGLE]] * 20 + [[]] * 5
    rng = random.Random(1)
    draws = [i for _ in range(4000) for i in balanced_draw(memory, 1, rng)]
    # one of three "classes" per draw: triangle (always with a rectangle), rectangle, no object
    share = _share_per_class(memory, draws)
    assert share[TRIANGLE] == pytest.approx(1 / 3 + 1 / 6, abs=0.03)  # triangle draws + half the rectangle draws
    assert sum(i >= 40 for i in draws) / len(draws) == pytest.approx(1 / 3, abs=0.03)
    assert class_counts(memory) == {RECTANGLE: 40, TRIANGLE: 20, NO_OBJECT: 5}


def test_draws_are_distinct_until_the_memory_is_exhausted_and_seeded():
    memory = [[RECTANGLE]] * 6 + [[TRIANGLE]] * 2
    drawn = balanced_draw(memory, 8, random.Random(2))
    assert sorted(drawn) == list(range(8))
    assert len(balanced_draw(memory, 20, random.Random(2))) == 20
    assert balanced_draw(memory, 5, random.Random(3)) == balanced_draw(memory, 5, random.Random(3))
    assert balanced_draw([], 4, random.Random(0)) == []
    assert balanced_draw(memory, 0, random.Random(0)) == []
    with pytest.raises(ValueError, match="-1"):
        balanced_draw(memory, -1, random.Random(0))


def _samples(n: int, seed: int = 0) -> list[Sample]:
    dataset = ShapesDataset(n, image_size=48, seed=seed)
    return [dataset[i] for i in range(n)]


def test_memory_round_trip_is_lossless_and_keeps_partial_labels(tmp_path):
    samples = _samples(6)
    declared = tuple(sorted(set(samples[0].labels.tolist())))
    samples[0] = dataclasses.replace(samples[0], labelled_classes=declared)  # complete for its own classes only
    memory = ReplayMemory(tmp_path, max_images=10, max_bytes=2**20, max_pixels=2**16, seed=0)
    assert memory.add(samples, {"job": "a"}) == 6
    draw = memory.draw(6)
    assert sorted(draw.keys) == memory.store.keys()
    originals = {tuple(s.image.flatten()[:64].tolist()): s for s in samples}
    for sample in draw.samples:
        original = originals[tuple(sample.image.flatten()[:64].tolist())]
        assert torch.equal(sample.image, original.image)
        assert torch.equal(sample.boxes, original.boxes) and torch.equal(sample.labels, original.labels)
        assert sample.labelled_classes == original.labelled_classes
    expected = Counter(c for s in samples for c in set(s.labels.tolist()))
    assert memory.class_counts() == dict(expected)


def test_memory_is_bounded_by_images_and_bytes(tmp_path):
    memory = ReplayMemory(tmp_path / "a", max_images=5, max_bytes=2**20, max_pixels=2**16, seed=0)
    memory.add(_samples(20))
    assert len(memory) == 5 and memory.store.seen == 20
    by_bytes = ReplayMemory(tmp_path / "b", max_images=100, max_bytes=12_000, max_pixels=2**16, seed=0)
    by_bytes.add(_samples(20))
    assert 0 < by_bytes.store.num_bytes <= 12_000 and len(by_bytes) < 20


_CHILD = """
import os, signal, sys
from ssd_core.online.replay import ReplayMemory
from ssd_core.data.synthetic import ShapesDataset
dataset = ShapesDataset(4, image_size=48, seed=0)
memory = ReplayMemory(sys.argv[1], max_images=10, max_bytes=2**20, max_pixels=2**16)
memory.add([dataset[i] for i in range(4)])
(memory.store.directory / ".tmp-sample-torn").write_bytes(b"half a write")  # a write in flight
with open(memory.store.directory / ("0" * 64 + ".sample"), "wb") as f:
    f.write(b'{"format": "ssd-sample/1", "key": "torn')  # a torn entry
print(len(memory), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_memory_survives_a_restart_and_kill_9(tmp_path):
    child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr
    assert child.stdout.strip() == "4"
    reopened = ReplayMemory(tmp_path, max_images=10, max_bytes=2**20, max_pixels=2**16)
    assert len(reopened) == 4 and reopened.corrupt == 1  # the torn entry dropped and counted
    assert reopened.store.seen == 4
    assert len(reopened.draw(4).samples) == 4
    assert not list(tmp_path.glob(".tmp-*"))
