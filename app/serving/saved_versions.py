"""The saved versions a restart or a rollback can load."""

from __future__ import annotations

from ssd_core.storage.checkpoint import CheckpointError, CheckpointInfo, CheckpointStore


def intact_versions(store: CheckpointStore) -> list[CheckpointInfo]:
    """The saved versions whose every file has the size and sha256 its sidecar records (what a
    restart or a rollback can load), oldest first. Verifying reads every checkpoint in full."""
    intact = []
    for info in store.versions():
        try:
            store.load(info.version)
        except CheckpointError:
            continue  # torn or corrupt: listed nowhere, never loaded
        intact.append(info)
    return intact
