"""Class-balanced replay: which earlier training images a step mixes back in.

The rule (`balanced_draw`): to draw one image, pick a class uniformly among the classes present in
the memory, then an image uniformly among those that contain it. Images without any object form one
more "class" of their own (they teach background). A rare class is therefore replayed as often as a
common one: with 1 000 images of rectangles and 10 of triangles, half the draws hold a triangle.
Draws within one call are without replacement while unseen candidates remain (a step never sees the
same replayed image twice unless the memory is smaller than the request).

Plain Python: no tensors, no I/O; the memory itself (which images, on disk) is `app`'s business.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

__all__ = ["NO_OBJECT", "balanced_draw", "class_counts"]

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
