"""Files on disk: checkpoints and the content-addressed sample store, written atomically."""

from ssd_core.storage.checkpoint import CheckpointError, CheckpointStore, LoadedCheckpoint, atomic_write
from ssd_core.storage.sample_store import SampleStore, content_key

__all__ = ["CheckpointError", "CheckpointStore", "LoadedCheckpoint", "SampleStore", "atomic_write", "content_key"]
