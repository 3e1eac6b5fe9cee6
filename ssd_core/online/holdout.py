"""Which images of a fine-tune job are held out for validation instead of trained on.

The decision is a function of the image's bytes only (their sha256, the sample store's key), so an
image sent again, in any job, always lands on the same side: nothing trained on can leak into the
validation set through a re-send.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ssd_core.storage.sample_store import content_key

__all__ = ["HoldoutSplit", "holdout_rank", "split_holdout"]


def holdout_rank(image: bytes) -> float:
    """A uniform number in [0, 1) fixed by the image's bytes: the first 64 bits of its sha256."""
    return int(content_key(image)[:16], 16) / 2**64


@dataclass(frozen=True)
class HoldoutSplit:
    """Indices into the job's images: `train` (trained on) and `held_out` (validation candidates);
    `returned`: images the hash would hold out that train instead, so that the job can train."""

    train: tuple[int, ...]
    held_out: tuple[int, ...]
    returned: tuple[int, ...] = ()


def split_holdout(
    images: Sequence[bytes], fraction: float, min_train: int, fill: int = 0, validating: Collection[int] = (),
) -> HoldoutSplit:
    """Hold out each image whose `holdout_rank` is below `fraction`, never leaving the job too few to train.

    Args:
        images: the job's image bytes as sent.
        fraction: in [0, 1); 0 holds out nothing.
        min_train: the fewest images a training step accepts (2 for a model with BatchNorm).
        fill: images the replay memory adds to every step (0: no replay).
        validating: indices of images already in the validation set: never returned to training.

    Returns:
        The split. The job keeps at least max(1, min_train - fill) of its images to train on: when the
        hash would hold out more, the held-out images of highest rank (the nearest to `fraction`), and not
        already validating, train instead (`returned`). Such an image is trained on although its hash
        reserves it for validation: a later job that sends it again would hold it out, so the rule costs a
        little validation purity in a job too small to split, rather than a job that silently trains on
        nothing. When even that leaves too few, the caller says the job cannot train.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if min_train < 1 or fill < 0:
        raise ValueError(f"need min_train >= 1 and fill >= 0, got {min_train}, {fill}")
    ranks = [holdout_rank(image) for image in images]
    held = [i for i, rank in enumerate(ranks) if rank < fraction]
    needed = max(1, min_train - fill)
    shortfall = max(0, needed - (len(images) - len(held)))
    by_rank = sorted((i for i in held if i not in validating), key=lambda i: ranks[i], reverse=True)
    returned = tuple(sorted(by_rank[:shortfall]))
    kept = tuple(i for i in held if i not in returned)
    return HoldoutSplit(tuple(i for i in range(len(images)) if i not in kept), kept, returned)
