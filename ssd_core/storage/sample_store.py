"""A persistent, bounded store of labelled images, addressed by the content hash of their bytes.

One entry is one file `<key>.sample` in the store's directory: a JSON header line, then the image
bytes exactly as they were sent. The key is the sha256 of those bytes, so the file checks itself:
the header records the image's size and the sha256 of its own annotation, and an entry whose file is
torn (a `kill -9` during a write), truncated or corrupt is dropped (file removed) and counted in
`corrupt`, never raised. Every write is atomic (temp file in the same directory, fsync, `os.replace`,
fsync the directory; `atomic.atomic_write`), as for the checkpoints. Nothing is pickled.

The bounds are a number of entries and a number of bytes. `offer` implements reservoir sampling
(Vitter's algorithm R) over every distinct image ever offered: once the store is full, the n-th image
replaces a uniformly chosen entry with probability `max_items / n`, so the store stays a uniform
sample of what was offered. The count of offers survives restarts (`state.json`). `put` always
stores (evicting uniformly chosen entries when a bound would be passed).

The index (key -> header) is held in memory; image bytes are read from disk on demand (`get`,
`entries`, `sample`), each read verified.

Used for the service's validation set (app.online.validation_set) and, in another directory, a replay memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssd_core.data.datasets import Sample
from ssd_core.data.images import decode_image_bytes
from ssd_core.storage.atomic import atomic_write

__all__ = ["OfferResult", "SampleStore", "StoredSample", "annotation_of", "content_key", "to_sample"]

logger = logging.getLogger(__name__)

FORMAT = "ssd-sample/1"
SUFFIX = ".sample"
STATE_NAME = "state.json"
_TEMP_PREFIX = ".tmp-sample-"


def content_key(image: bytes) -> str:
    """The key of an image: the sha256 hex digest of its bytes as sent."""
    return hashlib.sha256(image).hexdigest()


def _annotation_digest(annotation: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(annotation, sort_keys=True).encode()).hexdigest()


def annotation_of(sample: Sample) -> dict[str, Any]:
    """A sample's truths as JSON: {"boxes": [[x1, y1, x2, y2] pixels], "labels": [0-based], "difficult": [bool]}."""
    return {
        "boxes": sample.boxes.tolist(),
        "labels": sample.labels.tolist(),
        "difficult": sample.difficult.tolist(),
    }


def to_sample(entry: StoredSample, max_pixels: int) -> Sample:
    """Decode a stored entry into a `Sample` (image [3, H, W] uint8, boxes [N, 4] pixel xyxy)."""
    note = entry.annotation
    boxes = torch.tensor(note["boxes"], dtype=torch.float32).reshape(-1, 4)  # [N, 4]
    labels = torch.tensor(note["labels"], dtype=torch.long).reshape(-1)  # [N]
    difficult = torch.tensor(note.get("difficult") or [False] * len(labels), dtype=torch.bool).reshape(-1)  # [N]
    return Sample(decode_image_bytes(entry.image, max_pixels), boxes, labels, difficult)


@dataclass(frozen=True)
class StoredSample:
    """One entry: `key` (sha256 of `image`), the image bytes as sent, its JSON annotation and
    `meta` (the caller's JSON-able extras, e.g. the job it came from)."""

    key: str
    image: bytes
    annotation: dict[str, Any]
    meta: dict[str, Any]


@dataclass(frozen=True)
class _Header:
    key: str
    size: int  # image bytes
    annotation: dict[str, Any]
    annotation_sha256: str
    meta: dict[str, Any]


@dataclass(frozen=True)
class OfferResult:
    """What `offer` did: `stored` (the image is in the store now), `replaced` (the evicted keys)."""

    stored: bool
    replaced: tuple[str, ...] = ()


class SampleStore:
    """Labelled images on disk, at most `max_items` entries and `max_bytes` image bytes.

    Args:
        directory: created if missing; leftover temp files are removed and every entry is checked
            (header, image size and sha256): bad ones are deleted and counted in `corrupt`.
        max_items: most entries (>= 1).
        max_bytes: most image bytes in total (>= 1); one image larger than this is refused.
        seed: seeds the reservoir's and `sample`'s random choices (None: from the OS).

    Not thread-safe: callers serialise access (the service holds one lock around it).
    """

    def __init__(self, directory: str | os.PathLike[str], max_items: int, max_bytes: int, seed: int | None = None):
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.directory = Path(directory)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.corrupt = 0
        self._random = random.Random(seed)
        self._index: dict[str, _Header] = {}
        self.directory.mkdir(parents=True, exist_ok=True)
        for temp in self.directory.glob(_TEMP_PREFIX + "*"):
            temp.unlink(missing_ok=True)
        self.seen = self._read_seen()
        for path in sorted(self.directory.glob("*" + SUFFIX)):
            entry = self._read(path)
            if entry is not None:
                self._index[entry.key] = _Header(entry.key, len(entry.image), entry.annotation,
                                                 _annotation_digest(entry.annotation), entry.meta)
        self.seen = max(self.seen, len(self._index))

    # ---- reading

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[str]:
        """The keys, sorted (entries themselves: `entries`)."""
        return iter(self.keys())

    @property
    def num_bytes(self) -> int:
        """Image bytes held."""
        return sum(h.size for h in self._index.values())

    def keys(self) -> list[str]:
        """Keys of every entry, sorted."""
        return sorted(self._index)

    def annotations(self) -> dict[str, dict[str, Any]]:
        """key -> annotation of every entry (from the index: no disk reads)."""
        return {key: self._index[key].annotation for key in self.keys()}

    def sizes(self) -> dict[str, int]:
        """key -> image bytes of every entry."""
        return {key: self._index[key].size for key in self.keys()}

    def digest(self) -> str:
        """A hash of the set: sha256 over the sorted `entry_id`s. Equal digests mean the same images
        with the same annotations."""
        h = hashlib.sha256()
        for key in self.keys():
            h.update(f"{self.entry_id(key)}\n".encode())
        return h.hexdigest()

    def entry_id(self, key: str) -> str:
        """`key:annotation sha256`: names the image AND its annotation (an image re-sent with other boxes
        keeps its key, gets a new id)."""
        return f"{key}:{self._index[key].annotation_sha256}"

    def get(self, key: str) -> StoredSample | None:
        """The entry, read and verified; None when absent or found corrupt (then dropped and counted)."""
        if key not in self._index:
            return None
        entry = self._read(self._path(key))
        if entry is None:
            self._index.pop(key, None)
        return entry

    def entries(self) -> Iterator[StoredSample]:
        """Every intact entry in key order (a corrupt one is dropped and counted on the way)."""
        for key in self.keys():
            entry = self.get(key)
            if entry is not None:
                yield entry

    def sample(self, count: int) -> list[StoredSample]:
        """Up to `count` distinct entries chosen uniformly at random."""
        keys = self._random.sample(self.keys(), min(count, len(self)))
        return [entry for entry in map(self.get, keys) if entry is not None]

    # ---- writing

    def put(self, image: bytes, annotation: dict[str, Any], meta: dict[str, Any] | None = None) -> str:
        """Store one image (replacing the entry of the same bytes), evicting uniformly chosen other
        entries while a bound would be passed. Returns its key.

        Raises:
            ValueError: the image alone is larger than `max_bytes`.
        """
        key = content_key(image)
        if len(image) > self.max_bytes:
            raise ValueError(f"image of {len(image)} bytes exceeds the store's bound of {self.max_bytes} bytes")
        if key not in self._index:
            self.seen += 1
            self._write_seen()
        self._make_room(key, len(image))
        self._write(key, image, annotation, meta or {})
        return key

    def offer(self, image: bytes, annotation: dict[str, Any], meta: dict[str, Any] | None = None) -> OfferResult:
        """Reservoir sampling: store the image while there is room, else with probability
        `max_items / seen` in place of a uniformly chosen entry. An image already stored only
        has its annotation replaced; an image larger than `max_bytes` is not stored."""
        key = content_key(image)
        if key in self._index:
            self._write(key, image, annotation, meta or {})
            return OfferResult(True)
        if len(image) > self.max_bytes:
            return OfferResult(False)
        self.seen += 1
        self._write_seen()
        full = len(self) >= self.max_items or self.num_bytes + len(image) > self.max_bytes
        if full and self._random.random() >= self.max_items / self.seen:
            return OfferResult(False)
        replaced = self._make_room(key, len(image))
        self._write(key, image, annotation, meta or {})
        return OfferResult(True, replaced)

    def remove(self, key: str) -> bool:
        """Delete one entry; False when it was not there."""
        if self._index.pop(key, None) is None:
            return False
        self._path(key).unlink(missing_ok=True)
        return True

    def clear(self) -> int:
        """Delete every entry and reset the reservoir's count; returns how many were deleted."""
        count = len(self)
        for key in self.keys():
            self.remove(key)
        self.seen = 0
        self._write_seen()
        return count

    # ---- internals

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def _make_room(self, key: str, size: int) -> tuple[str, ...]:
        """Evict uniformly chosen entries other than `key` until one more of `size` bytes fits."""
        evicted = []
        others = [k for k in self.keys() if k != key]
        self._random.shuffle(others)
        held = self.num_bytes - (self._index[key].size if key in self._index else 0)
        count = len(others)
        while others and (count + 1 > self.max_items or held + size > self.max_bytes):
            victim = others.pop()
            held -= self._index[victim].size
            count -= 1
            self.remove(victim)
            evicted.append(victim)
        return tuple(evicted)

    def _write(self, key: str, image: bytes, annotation: dict[str, Any], meta: dict[str, Any]) -> None:
        digest = _annotation_digest(annotation)
        header = {"format": FORMAT, "key": key, "size": len(image), "annotation": annotation,
                  "annotation_sha256": digest, "meta": meta}
        atomic_write(self._path(key), json.dumps(header, sort_keys=True).encode() + b"\n" + image, _TEMP_PREFIX)
        self._index[key] = _Header(key, len(image), annotation, digest, meta)

    def _read(self, path: Path) -> StoredSample | None:
        """A verified entry, or None after deleting and counting a bad file."""
        try:
            data = path.read_bytes()
            line, _, image = data.partition(b"\n")
            header = json.loads(line)
            key = header["key"]
            valid = (
                header["format"] == FORMAT
                and path.name == f"{key}{SUFFIX}"
                and header["size"] == len(image)
                and content_key(image) == key
                and _annotation_digest(header["annotation"]) == header["annotation_sha256"]
            )
        except FileNotFoundError:
            valid, reason = False, "missing"
        except (OSError, ValueError, KeyError, TypeError) as error:
            valid, reason = False, repr(error)
        else:
            reason = "size or sha256 does not match (torn or corrupt)"
        if not valid:
            logger.warning("dropping sample store entry %s: %s", path, reason)
            self.corrupt += 1
            path.unlink(missing_ok=True)
            return None
        return StoredSample(key, image, header["annotation"], header.get("meta") or {})

    def _read_seen(self) -> int:
        try:
            return int(json.loads((self.directory / STATE_NAME).read_bytes())["seen"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("%s: unreadable reservoir count; counting from the entries", self.directory / STATE_NAME)
            return 0

    def _write_seen(self) -> None:
        atomic_write(self.directory / STATE_NAME, json.dumps({"seen": self.seen}).encode(), _TEMP_PREFIX)
