"""Shared pieces of the reliability tests.

Live servers come from the integration harness (`tests.integration.live.run_service`: a real process
on a free loopback port, small model, its own checkpoint directory, always stopped); in-process apps
from the service tests' helpers (`tests.app.conftest`). What is added here: Prometheus scrapes with
label filters, server memory, and an independent reading of a checkpoint directory (sidecar JSON
and sha256 of every file, not `CheckpointStore`'s own code).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from app.online.journal import JOURNAL_NAME
from ssd_core.storage.version_numbers import MARK_NAME, MARK_TEMP_PREFIX

# the live services of the fault and load tests run the unprotected mode, like the in-process ones
# (tests/app/conftest.py): every step publishes and every image trains, no job is screened, held out or
# rejected, so their accounting is exact; the gated mode's restarts and kill -9: tests/app/online/test_gate_over_http.py
PLUMBING = {"SSD_PUBLISH": "every_step", "SSD_HOLDOUT_FRACTION": "0"}

CHECKPOINT_SIDECAR = re.compile(r"^ckpt-(\d{8})\.json$")


class Scrape:
    """One `/metrics` scrape; `value(name, **labels)` sums the samples whose labels include `labels`."""

    def __init__(self, text: str) -> None:
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        return sum(
            value for sample_name, sample_labels, value in self.samples
            if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def label_values(self, name: str, label: str) -> set[str]:
        return {labels[label] for sample_name, labels, _ in self.samples if sample_name == name and label in labels}


def scrape(url: str) -> Scrape:
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    return Scrape(response.text)


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` in MiB."""
    return psutil.Process(pid).memory_info().rss / 2**20


def complete_checkpoints(directory: Path) -> list[int]:
    """Versions in `directory` whose sidecar parses and whose every data file has the size and sha256
    the sidecar records, oldest first: what a reader may load. Read without `CheckpointStore`."""
    complete = []
    for sidecar_path in sorted(directory.glob("ckpt-*.json")):
        match = CHECKPOINT_SIDECAR.match(sidecar_path.name)
        if match is None:
            continue
        try:
            sidecar = json.loads(sidecar_path.read_bytes())
            files = sidecar["files"].values()
            intact = all(_file_matches(directory / entry["name"], entry) for entry in files)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if intact and sidecar["meta"]["version"] == int(match.group(1)):
            complete.append(int(match.group(1)))
    return sorted(complete)


def _file_matches(path: Path, entry: dict) -> bool:
    data = path.read_bytes()
    return len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]


VERSION_MARK_FILES = (MARK_NAME, MARK_TEMP_PREFIX)


def _checkpoint_files(directory: Path) -> dict[str, Path]:
    """Every file under `directory` (the validation set's too) by relative name, but the job journal
    (which records jobs, not weights) and the version high-water mark with its temporary files (a job
    reserves a number before its first step, whether or not anything is then published)."""
    return {str(path.relative_to(directory)): path for path in sorted(directory.rglob("*"))
            if path.is_file() and path.name != JOURNAL_NAME and not path.name.startswith(VERSION_MARK_FILES)}


def checkpoint_digests(directory: Path) -> dict[str, str]:
    """sha256 of every checkpoint file (temp files included) by name, to show they were left exactly as they were."""
    return {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in _checkpoint_files(directory).items()}


def file_stamps(directory: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every checkpoint file by name: a cheap "nothing was written" check."""
    return {name: (path.stat().st_size, path.stat().st_mtime_ns) for name, path in _checkpoint_files(directory).items()}
