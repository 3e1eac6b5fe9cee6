"""Files on disk: checkpoints (and their meta) and the content-addressed sample store, written atomically."""

from ssd_core.storage.atomic import atomic_write
from ssd_core.storage.checkpoint import CheckpointError, CheckpointStore, LoadedCheckpoint
from ssd_core.storage.checkpoint_meta import checkpoint_meta, next_version, recorded_priors
from ssd_core.storage.sample_store import SampleStore, content_key
from ssd_core.storage.version_numbers import VersionNumbers

__all__ = [
    "CheckpointError", "CheckpointStore", "LoadedCheckpoint", "SampleStore", "VersionNumbers", "atomic_write",
    "checkpoint_meta", "content_key", "next_version", "recorded_priors",
]
