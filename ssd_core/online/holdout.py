"""Which images of a fine-tune job are held out for validation instead of trained on.

The decision is a function of the image's bytes only (their sha256, the sample store's key), so an
image sent again, in any job, always lands on the same side: nothing trained on can leak into the
validation set through a re-send.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ssd_core.storage.sample_store import content_key

__all__ = ["HoldoutSplit", "holdout_rank", "split_holdout"]


def holdout_rank(image: bytes) -> float:
    """A uniform number in [0, 1) fixed by the image's bytes: the first 64 bits of its sha256."""
    return int(content_key(image)[:16], 16) / 2**64


@dataclass(frozen=True)
class HoldoutSplit:
    """Indices into the job's images: `train` (trained on) and `held_out` (validation candidates)."""

    train: tuple[int, ...]
    held_out: tuple[int, ...]


def split_holdout(images: Sequence[bytes], fraction: float, min_train: int) -> HoldoutSplit:
    """Hold out each image whose `holdout_rank` is below `fraction`.

    Args:
        images: the job's image bytes as sent.
        fraction: in [0, 1); 0 holds out nothing.
        min_train: the fewest images a training step accepts (2 for a model with BatchNorm).

    Returns:
        The split. When fewer than `min_train` images would remain to train on, `train` is empty:
        the job trains on nothing rather than on an image the hash reserves for validation (which a
        later job could then hold out after training on it). The caller says so in the job.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    held = tuple(i for i, image in enumerate(images) if holdout_rank(image) < fraction)
    train = tuple(i for i in range(len(images)) if i not in held)
    return HoldoutSplit(train if len(train) >= min_train else (), held)
