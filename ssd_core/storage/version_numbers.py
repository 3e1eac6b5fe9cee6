"""Model version numbers that are never reused, whatever is killed when.

A number is handed out only after a high-water mark at least as high is on disk (`versions.json` in the
checkpoint directory, written atomically and fsync'd), so a process started after a crash never hands out
a number an earlier process may have served, even if that version's checkpoint never reached the disk.
Numbers above the version a restart resumes from that no loadable checkpoint holds are *lost*: they named
weights nobody can load again. They are recorded in the mark file (ranges, newest last, bounded) so the
service can report them. Without a directory the numbers live in memory and restart with the process.

Cost: one small fsync'd write (file and directory) per number handed out; the service hands one out per
published version, so with SSD_PUBLISH=every_step one per optimizer step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ssd_core.storage.atomic import atomic_write
from ssd_core.storage.checkpoint import CheckpointStore

__all__ = ["MARK_NAME", "MARK_TEMP_PREFIX", "VersionNumbers", "highest_issued"]

logger = logging.getLogger(__name__)

MARK_NAME = "versions.json"
MARK_TEMP_PREFIX = ".tmp-versions-"
MAX_LOST_RANGES = 100  # the oldest lost ranges are forgotten past this many restarts that lost something


def _read_mark(path: Path | None) -> tuple[int, list[tuple[int, int]]]:
    """(the highest number handed out, the lost ranges) recorded at `path`; (0, []) without one."""
    if path is None:
        return 0, []
    try:
        mark = json.loads(path.read_bytes())
        return int(mark["issued"]), [(int(first), int(last)) for first, last in mark.get("lost", [])]
    except FileNotFoundError:
        return 0, []
    except (OSError, ValueError, KeyError, TypeError) as error:
        # written atomically, so only a hand edit gets here; the checkpoint files still bound the numbers
        logger.warning("%s: unreadable version mark (%s)", path, error)
        return 0, []


def highest_issued(store: CheckpointStore) -> int:
    """The highest version number `store`'s directory has seen: its mark or any checkpoint file's."""
    return max([_read_mark(store.directory / MARK_NAME)[0], *store.file_versions()])


class VersionNumbers:
    """The numbers of published versions: strictly increasing over the life of a checkpoint directory.

    Args:
        store: the checkpoint store whose directory holds the mark (None: numbers in memory only).
        resumed: the version the process starts serving (the checkpoint it loaded; 0 for a fresh model).
            Any number above it that was handed out before (the mark, or a checkpoint file, torn or not)
            is recorded as lost; the next number is one above the highest.

    Raises:
        OSError: the mark cannot be written (only when something was lost and must be recorded).
    """

    def __init__(self, store: CheckpointStore | None, resumed: int) -> None:
        self.path = None if store is None else store.directory / MARK_NAME
        issued, lost = _read_mark(self.path)
        highest = max([resumed, issued, *([] if store is None else store.file_versions())])
        self._issued = highest
        self._reserved: int | None = None
        self._lost = lost
        if highest > resumed and not (store is not None and store.read_only):
            self._lost = [*self._lost, (resumed + 1, highest)][-MAX_LOST_RANGES:]
            logger.warning("versions %d-%d were handed out before the last stop but no loadable checkpoint holds "
                           "them: they are lost (serving version %d, the next version is %d)",
                           resumed + 1, highest, resumed, highest + 1)
            self._write(highest)

    def _write(self, issued: int) -> None:
        if self.path is not None:
            body = {"issued": issued, "lost": [list(r) for r in self._lost]}
            atomic_write(self.path, json.dumps(body).encode(), MARK_TEMP_PREFIX)

    @property
    def issued(self) -> int:
        """The highest number handed out or reserved."""
        return self._issued

    @property
    def lost(self) -> list[tuple[int, int]]:
        """Lost numbers as inclusive ranges (first, last), oldest first."""
        return list(self._lost)

    def reserve(self) -> int:
        """The next number, durable before it is returned; the same one until `take` or `discard`.

        Raises:
            OSError: the mark cannot be written (full or read-only disk): no number is handed out.
        """
        if self._reserved is None:
            self._write(self._issued + 1)
            self._issued += 1
            self._reserved = self._issued
        return self._reserved

    def take(self) -> int:
        """Hand out the reserved number (reserving one first if none is)."""
        number = self.reserve()
        self._reserved = None
        return number

    def discard(self) -> None:
        """Never hand out the reserved number (something may already name it: a checkpoint written for a
        state change that then failed); the next `reserve` moves past it."""
        self._reserved = None
