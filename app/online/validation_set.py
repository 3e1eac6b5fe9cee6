"""The service's validation set: labelled images the model is evaluated on and never trained on.

A `SampleStore` in `<SSD_CHECKPOINT_DIR>/validation` (bounded by SSD_VALIDATION_MAX_IMAGES and
SSD_VALIDATION_MAX_BYTES, reservoir sampling once full), so it survives restarts and `kill -9`.
Without a checkpoint directory it lives in a temporary directory for the life of the process.
Filled by the held-out images of accepted jobs and by `POST /validation`. Decoded samples are
cached; every method is thread-safe.
"""

from __future__ import annotations

import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from app.core.settings import Settings
from ssd_core.data.datasets import Sample
from ssd_core.storage.sample_store import SampleStore, annotation_of, content_key, to_sample

DIRECTORY = "validation"


@dataclass(frozen=True)
class Added:
    """What `add` did: `added` images now stored, `dropped` not kept, `replaced` entries evicted."""

    added: int
    dropped: int
    replaced: int


class ValidationSet:
    """Args: settings (bounds, classes, pixel limit); directory: the checkpoint directory, or None."""

    def __init__(self, settings: Settings, directory: Path | None) -> None:
        self.settings = settings
        self._temporary = None if directory is not None else tempfile.TemporaryDirectory(prefix="ssd-validation-")
        root = Path(directory) / DIRECTORY if directory is not None else Path(self._temporary.name)
        self.store = SampleStore(root, settings.validation_max_images, settings.validation_max_bytes)
        self._lock = threading.Lock()
        self._decoded: dict[str, Sample] = {}

    def __len__(self) -> int:
        return len(self.store)

    def add(self, items: list[tuple[bytes, Sample]], meta: dict | None = None) -> Added:
        """Offer each (image bytes as sent, its decoded sample) to the reservoir."""
        added = dropped = replaced = 0
        with self._lock:
            for image, sample in items:
                result = self.store.offer(image, annotation_of(sample), meta)
                for key in (content_key(image), *result.replaced):  # re-annotated or evicted
                    self._decoded.pop(key, None)
                added += result.stored
                dropped += not result.stored
                replaced += len(result.replaced)
        return Added(added, dropped, replaced)

    def holds(self, image: bytes) -> bool:
        """Whether these image bytes are an entry of the set (whatever their annotation)."""
        with self._lock:
            return content_key(image) in self.store

    def snapshot(self) -> tuple[list[str], list[Sample], str]:
        """The entries' ids (`SampleStore.entry_id`: image and annotation) and samples in key order and the
        set's digest, consistent with each other."""
        with self._lock:
            ids, samples = [], []
            for entry in self.store.entries():  # a corrupt entry is dropped on the way
                sample = self._decoded.get(entry.key)
                if sample is None:
                    sample = self._decoded[entry.key] = to_sample(entry, self.settings.max_image_pixels)
                ids.append(self.store.entry_id(entry.key))
                samples.append(sample)
            return ids, samples, self.store.digest()

    def clear(self) -> int:
        with self._lock:
            self._decoded.clear()
            return self.store.clear()

    def describe(self) -> dict:
        """Counts, bytes, digest, boxes per class name, and one row per entry (for `GET /validation`)."""
        name = self.settings.class_name
        with self._lock:
            annotations, sizes = self.store.annotations(), self.store.sizes()
            total: Counter[str] = Counter()
            entries = []
            for key, note in annotations.items():
                boxes = Counter(name(int(label)) for label in note["labels"])
                total.update(boxes)
                entries.append({"key": key, "bytes": sizes[key], "boxes": dict(boxes)})
            return {
                "images": len(entries), "bytes": sum(sizes.values()), "hash": self.store.digest(),
                "boxes": dict(total), "max_images": self.store.max_items, "max_bytes": self.store.max_bytes,
                "corrupt_dropped": self.store.corrupt, "entries": entries,
            }
