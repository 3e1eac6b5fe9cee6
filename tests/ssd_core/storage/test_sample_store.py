"""SampleStore: content keys, persistence across reopen, bounds, reservoir uniformity, corrupt entries dropped."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from ssd_core.data.images import encode_png
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.storage.sample_store import SampleStore, annotation_of, content_key, to_sample

NOTE = {"boxes": [[1.0, 2.0, 5.0, 6.0]], "labels": [1], "difficult": [False]}


def _image(i: int, size: int = 10) -> bytes:
    return i.to_bytes(4, "little") * size  # distinct bytes per i, `4 * size` long


def test_put_get_round_trip_and_content_key(tmp_path):
    store = SampleStore(tmp_path, max_items=5, max_bytes=10_000)
    key = store.put(_image(1), NOTE, {"job": "a"})
    assert key == hashlib.sha256(_image(1)).hexdigest() == content_key(_image(1))
    assert key in store and len(store) == 1 and store.num_bytes == 40
    entry = store.get(key)
    assert entry.image == _image(1) and entry.annotation == NOTE and entry.meta == {"job": "a"}
    assert store.get("0" * 64) is None


def test_reopen_keeps_entries_digest_and_seen(tmp_path):
    store = SampleStore(tmp_path, max_items=5, max_bytes=10_000)
    for i in range(3):
        store.put(_image(i), {**NOTE, "labels": [i]})
    digest = store.digest()
    again = SampleStore(tmp_path, max_items=5, max_bytes=10_000)
    assert again.keys() == store.keys() and again.digest() == digest and again.seen == 3
    assert [e.annotation["labels"] for e in again.entries()] == [store.get(k).annotation["labels"] for k in store]
    assert again.corrupt == 0


def test_digest_changes_with_annotation_and_membership(tmp_path):
    store = SampleStore(tmp_path, max_items=5, max_bytes=10_000)
    store.put(_image(1), NOTE)
    first = store.digest()
    store.put(_image(1), {**NOTE, "labels": [2]})  # same image, new truth
    assert store.digest() != first and len(store) == 1
    store.put(_image(1), NOTE)
    assert store.digest() == first
    store.put(_image(2), NOTE)
    assert store.digest() != first
    store.remove(content_key(_image(2)))
    assert store.digest() == first


def test_put_respects_item_and_byte_bounds(tmp_path):
    store = SampleStore(tmp_path, max_items=3, max_bytes=100, seed=0)
    for i in range(10):
        store.put(_image(i), NOTE)
        assert len(store) <= 3 and store.num_bytes <= 100
    assert content_key(_image(9)) in store  # put always stores the new one
    big = SampleStore(tmp_path / "b", max_items=10, max_bytes=100, seed=0)
    for i in range(5):
        big.put(_image(i, size=10), NOTE)  # 40 bytes each: at most 2 fit
    assert len(big) == 2 and big.num_bytes == 80
    with pytest.raises(ValueError, match="101 bytes"):
        big.put(b"x" * 101, NOTE)
    assert len(list(tmp_path.glob("b/*.sample"))) == 2  # files follow the index


def test_offer_is_a_uniform_reservoir(tmp_path):
    """Over many seeded runs, each of 20 offered images ends in a 5-entry store with probability 5/20."""
    hits = torch.zeros(20)
    runs = 200
    for run in range(runs):
        store = SampleStore(tmp_path / str(run), max_items=5, max_bytes=10_000, seed=run)
        for i in range(20):
            store.offer(_image(i), NOTE)
            assert len(store) <= 5
        for i in range(20):
            hits[i] += content_key(_image(i)) in store
    assert store.seen == 20
    frequency = hits / runs  # each ~ Binomial(200, 0.25) / 200, sd ~0.031
    assert (frequency - 0.25).abs().max() < 0.12, frequency
    assert frequency[:5].mean() == pytest.approx(0.25, abs=0.06)  # the first ones are not favoured
    assert frequency[-5:].mean() == pytest.approx(0.25, abs=0.06)


def test_offer_of_a_stored_image_updates_it_without_counting(tmp_path):
    store = SampleStore(tmp_path, max_items=2, max_bytes=10_000, seed=1)
    store.offer(_image(1), NOTE)
    result = store.offer(_image(1), {**NOTE, "labels": [0]})
    assert result.stored and store.seen == 1 and store.get(content_key(_image(1))).annotation["labels"] == [0]


def test_torn_and_corrupt_entries_are_dropped_and_counted(tmp_path):
    store = SampleStore(tmp_path, max_items=10, max_bytes=10_000)
    keys = [store.put(_image(i), NOTE) for i in range(4)]
    path = lambda k: tmp_path / f"{k}.sample"  # noqa: E731
    data = path(keys[0]).read_bytes()
    path(keys[0]).write_bytes(data[: len(data) - 5])  # torn: the image is short
    flipped = bytearray(path(keys[1]).read_bytes())
    flipped[-1] ^= 0xFF  # one image byte
    path(keys[1]).write_bytes(bytes(flipped))
    text = path(keys[2]).read_bytes().replace(b'"labels": [1]', b'"labels": [2]')  # annotation edited
    path(keys[2]).write_bytes(text)
    (tmp_path / ".tmp-sample-abc").write_bytes(b"half a write")
    again = SampleStore(tmp_path, max_items=10, max_bytes=10_000)
    assert again.keys() == [keys[3]] and again.corrupt == 3
    assert not path(keys[0]).exists() and not (tmp_path / ".tmp-sample-abc").exists()
    # corruption found later, on read, is dropped the same way
    path(keys[3]).write_bytes(b"garbage")
    assert again.get(keys[3]) is None and len(again) == 0 and again.corrupt == 4


def test_clear_and_sample(tmp_path):
    store = SampleStore(tmp_path, max_items=10, max_bytes=10_000, seed=0)
    for i in range(6):
        store.put(_image(i), NOTE)
    chosen = store.sample(4)
    assert len({e.key for e in chosen}) == 4 and all(e.key in store for e in chosen)
    assert len(store.sample(100)) == 6
    assert store.clear() == 6 and len(store) == 0 and store.seen == 0
    assert not list(tmp_path.glob("*.sample"))
    assert SampleStore(tmp_path, max_items=10, max_bytes=10_000).seen == 0


def test_to_sample_decodes_what_annotation_of_wrote(tmp_path):
    sample = ShapesDataset(1, image_size=32, seed=2)[0]
    store = SampleStore(tmp_path, max_items=2, max_bytes=100_000)
    key = store.put(encode_png(sample.image), annotation_of(sample))
    back = to_sample(store.get(key), max_pixels=32 * 32)
    assert torch.equal(back.image, sample.image) and torch.equal(back.boxes, sample.boxes)
    assert torch.equal(back.labels, sample.labels) and torch.equal(back.difficult, sample.difficult)


def test_bad_bounds_raise(tmp_path):
    with pytest.raises(ValueError, match="max_items must be >= 1, got 0"):
        SampleStore(tmp_path, max_items=0, max_bytes=1)
    with pytest.raises(ValueError, match="max_bytes must be >= 1, got 0"):
        SampleStore(tmp_path, max_items=1, max_bytes=0)
    assert os.path.isdir(tmp_path)
