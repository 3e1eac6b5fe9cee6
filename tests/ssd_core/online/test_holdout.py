"""The holdout (ssd_core.online.holdout): which images of a job are kept for validation, by their bytes."""

from __future__ import annotations

import pytest

from ssd_core.online.holdout import holdout_rank, split_holdout


def test_holdout_is_a_function_of_the_bytes_and_stable_under_resending():
    images = [bytes([i, i + 1, 7]) * 5 for i in range(200)]
    first = split_holdout(images, 0.1, min_train=1)
    resent = split_holdout(list(reversed(images)), 0.1, min_train=1)  # the same images, another job order
    held = {images[i] for i in first.held_out}
    assert held == {images[::-1][i] for i in resent.held_out}
    assert set(first.train) | set(first.held_out) == set(range(200)) and not set(first.train) & set(first.held_out)
    assert 8 <= len(held) <= 35  # ~Binomial(200, 0.1)
    assert all(holdout_rank(image) < 0.1 for image in held)
    assert split_holdout(images, 0.0, 1).held_out == ()


def test_the_holdout_never_leaves_a_job_too_few_images_to_train():
    images = [i.to_bytes(2, "little") * 9 for i in range(400)]
    held = sorted((im for im in images if holdout_rank(im) < 0.5), key=holdout_rank)
    kept = [im for im in images if holdout_rank(im) >= 0.5]
    # a 2-image job of a BatchNorm model with one image held out by its hash: the held image trains too
    split = split_holdout([held[0], kept[0]], 0.5, min_train=2)
    assert split.train == (0, 1) and split.held_out == () and split.returned == (0,)
    # three images, two held out: the one of highest rank (nearest the fraction) is the one returned
    split = split_holdout([held[0], held[-1], kept[0]], 0.5, min_train=2)
    assert split.train == (1, 2) and split.held_out == (0,) and split.returned == (1,)
    # replay fills the batch: one image of the job's own is enough, the holdout keeps its image
    split = split_holdout([held[0], kept[0]], 0.5, min_train=2, fill=1)
    assert split.train == (1,) and split.held_out == (0,) and split.returned == ()
    # every image held out by the hash: one still trains, whatever replay adds
    split = split_holdout([held[0], held[1]], 0.5, min_train=2, fill=4)
    assert len(split.train) == 1 and len(split.held_out) == 1
    # an image already in the validation set is never returned: the job stays short (the caller says so)
    split = split_holdout([held[0], kept[0]], 0.5, min_train=2, validating={0})
    assert split.train == (1,) and split.held_out == (0,) and split.returned == ()
    # enough images: nothing returned
    assert split_holdout([held[0], kept[0], kept[1]], 0.5, min_train=2) == split_holdout(
        [held[0], kept[0], kept[1]], 0.5, 2) and split_holdout([held[0], kept[0], kept[1]], 0.5, 2).train == (1, 2)
    with pytest.raises(ValueError, match=r"got 1\.0"):
        split_holdout(images, 1.0, 1)
