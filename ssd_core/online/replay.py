"""Class-balanced replay memory: earlier training images that later steps mix back in.

`ReplayMemory` keeps accepted jobs' training images in a persistent, bounded `SampleStore` (its own
directory; reservoir sampling over every image ever offered, so once full it stays a uniform
sample of what was trained on) and draws from it class-balanced.

The rule (`balanced_draw`): to draw one image, pick a class uniformly among the classes present in
the memory, then an image uniformly among those that contain it. Images without any object form one
more "class" of their own (they teach background). A rare class is therefore replayed as often as a
common one: with 1 000 images of rectangles and 10 of triangles, half the draws hold a triangle.
Draws within one call are without replacement while unseen candidates remain (a step never sees the
same replayed image twice unless the memory is smaller than the request).

`balanced_draw` is plain Python (no tensors, no I/O); which jobs may add images (accepted ones only,
never held-out validation images) is the caller's rule (`app.online.worker`).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ssd_core.data.datasets import Sample
from ssd_core.data.images import encode_png
from ssd_core.storage.sample_store import SampleStore, annotation_of, to_sample

__all__ = ["NO_OBJECT", "ReplayDraw", "ReplayMemory", "balanced_draw", "class_counts"]

NO_OBJECT = -1  # the class of an image without objects


def _classes(labels: Iterable[int]) -> set[int]:
    present = set(labels)
    return present or {NO_OBJECT}


def class_counts(labels_per_image: Sequence[Iterable[int]]) -> dict[int, int]:
    """Images per class (an image counts once per class it contains; `NO_OBJECT` for empty ones).

    Args:
        labels_per_image: per image, its objects' 0-based labels.

    Returns:
        {class: number of images containing it}.
    """
    counts: dict[int, int] = {}
    for labels in labels_per_image:
        for label in _classes(labels):
            counts[label] = counts.get(label, 0) + 1
    return counts


def balanced_draw(labels_per_image: Sequence[Iterable[int]], k: int, rng: random.Random) -> list[int]:
    """Indices of `k` images drawn class-balanced (module docstring's rule).

    Args:
        labels_per_image: per image of the memory, its objects' 0-based labels.
        k: how many to draw (>= 0).
        rng: the random source (seed it for reproducible draws).

    Returns:
        `k` indices into `labels_per_image` (none when it is empty); distinct while k <= its length.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    by_class: dict[int, list[int]] = {}
    for index, labels in enumerate(labels_per_image):
        for label in _classes(labels):
            by_class.setdefault(label, []).append(index)
    if not by_class:
        return []
    classes = sorted(by_class)  # sorted: the same seed draws the same images
    drawn: list[int] = []
    unused = set(range(len(labels_per_image)))
    while len(drawn) < k:
        if not unused:
            unused = set(range(len(labels_per_image)))  # more requested than stored: start over
        open_classes = [c for c in classes if any(i in unused for i in by_class[c])]
        choice = rng.choice([i for i in by_class[rng.choice(open_classes)] if i in unused])
        unused.discard(choice)
        drawn.append(choice)
    return drawn


def _as_list(labels: Sequence[int] | None) -> list[int] | None:
    return None if labels is None else list(labels)


def _as_tuple(labels: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if labels is None else tuple(labels)


@dataclass(frozen=True)
class ReplayDraw:
    """Images drawn for one step: `samples` (decoded), their store `keys`, in the same order."""

    samples: list[Sample]
    keys: list[str]


class ReplayMemory:
    """Earlier training images on disk, at most `max_images` and `max_bytes`, drawn class-balanced.

    Images are stored PNG-encoded (lossless) from the decoded training samples, with their boxes,
    labels, difficult flags and partial labels (`labelled_classes`: a replayed image is trained with
    the same class mask as when it was sent), one self-checking file each (`ssd_core.storage.sample_store`): a restart or
    `kill -9` keeps every completed write, a torn entry is dropped and counted in `corrupt`.

    Args:
        directory: the memory's own directory (created if missing).
        max_images, max_bytes: the bounds (>= 1).
        max_pixels: decoding bound for stored images (as for requests).
        seed: seeds reservoir replacement and draws (None: from the OS).

    Not thread-safe: the caller serialises access.
    """

    def __init__(
        self, directory: str | os.PathLike[str], max_images: int, max_bytes: int, max_pixels: int,
        seed: int | None = None,
    ) -> None:
        self.store = SampleStore(directory, max_images, max_bytes, seed=seed)
        self.max_pixels = max_pixels
        self._random = random.Random(seed)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def corrupt(self) -> int:
        """Entries found torn or corrupt and dropped since start."""
        return self.store.corrupt

    def add(self, samples: Sequence[Sample], meta: dict | None = None) -> int:
        """Offer training samples (image uint8 [3, H, W], boxes [N, 4] pixel xyxy) to the reservoir;
        returns how many are stored now. `meta` (JSON-able, e.g. the job id) is kept with each."""
        stored = 0
        for sample in samples:
            annotation = {**annotation_of(sample), "labelled_classes": _as_list(sample.labelled_classes)}
            stored += self.store.offer(encode_png(sample.image), annotation, meta).stored
        return stored

    def class_counts(self) -> dict[int, int]:
        """Stored images per 0-based class (`NO_OBJECT` for images without objects)."""
        return class_counts([note["labels"] for note in self.store.annotations().values()])

    def draw(self, count: int) -> ReplayDraw:
        """`count` images drawn class-balanced (`balanced_draw`), decoded; fewer only when entries are
        found corrupt on reading (then dropped)."""
        annotations = self.store.annotations()  # key -> annotation, sorted by key
        keys = list(annotations)
        chosen = [keys[i] for i in balanced_draw([a["labels"] for a in annotations.values()], count, self._random)]
        samples, drawn = [], []
        for key in chosen:
            entry = self.store.get(key)
            if entry is not None:
                declared = entry.annotation.get("labelled_classes")
                sample = to_sample(entry, self.max_pixels)
                samples.append(dataclasses.replace(sample, labelled_classes=_as_tuple(declared)))
                drawn.append(key)
        return ReplayDraw(samples, drawn)
