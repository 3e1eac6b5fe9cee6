"""Checkpoints on disk: safetensors weights, optional optimizer state, and a JSON sidecar.

One checkpoint version N is up to four files in one directory:
  * `ckpt-{N:08d}.safetensors`           the model's state dict: the weights that were served (with an
                                         EMA of the weights, the EMA), what every reader loads;
  * `ckpt-{N:08d}.optim.safetensors`     optional optimizer tensors (e.g. momentum buffers);
  * `ckpt-{N:08d}.training.safetensors`  optional raw training weights, when the optimizer trains
                                         other weights than the served ones (an EMA: `ssd_core.training.ema`);
  * `ckpt-{N:08d}.json`                  the sidecar: caller's meta (version, step, model, classes, ...),
                                         creation time, the optimizer's param-group layout, and the
                                         size and sha256 of each data file.
Pinned versions (`pin`, listed in `pins.json`, written atomically) are never pruned.
Every file is written atomically (temp file in the same directory, fsync, `os.replace`, fsync the
directory) and the sidecar last, so a checkpoint counts only once all its bytes are on disk. Nothing
is ever pickled: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
from torch import Tensor

from ssd_core.storage.atomic import atomic_write

__all__ = ["CheckpointError", "CheckpointInfo", "CheckpointStore", "LoadedCheckpoint"]

logger = logging.getLogger(__name__)

FORMAT = "ssd-checkpoint/1"
_FILE_RE = re.compile(r"^ckpt-(\d{8})\.(json|safetensors|optim\.safetensors|training\.safetensors)$")
_TEMP_PREFIX = ".tmp-ckpt-"
PINS_NAME = "pins.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or does not match its sidecar."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint version as described by its sidecar.

    Attributes:
        version: the model version (from `meta["version"]`).
        step: the training step (from `meta.get("step", 0)`).
        created: ISO-8601 UTC creation time.
        sidecar: path of the JSON sidecar.
        weights: path of the weights file.
        optimizer: path of the optimizer file, or None if none was saved.
        training_weights: path of the raw training weights, or None if none were saved.
        meta: the caller's meta dict as saved.
    """

    version: int
    step: int
    created: str
    sidecar: Path
    weights: Path
    optimizer: Path | None
    training_weights: Path | None
    meta: dict[str, Any]


class LoadedCheckpoint(NamedTuple):
    """`(state_dict, meta, optimizer_state, training_weights)`; the last two are None if not saved."""

    state_dict: dict[str, Tensor]
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None
    training_weights: dict[str, Tensor] | None = None


def _version_of(path: Path) -> int | None:
    """The version number in a checkpoint file's name, None for other files."""
    match = _FILE_RE.match(path.name)
    return int(match.group(1)) if match else None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serialise(state_dict: dict[str, Tensor]) -> bytes:
    """safetensors bytes of CPU, contiguous copies of `state_dict`'s tensors."""
    return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})


def _file_entry(path: Path, data: bytes) -> dict[str, Any]:
    """The sidecar's record of one data file: name, size and sha256."""
    return {"name": path.name, "size": len(data), "sha256": _sha256(data)}


def _flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into safetensors tensors and a JSON-able layout.

    Tensor `state[i][name]` becomes key `state.{i}.{name}`; non-tensor per-parameter values and the
    param groups (hyper-parameters and parameter indices) go into the layout.
    """
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    layout = {"param_groups": state["param_groups"], "scalars": scalars}
    return tensors, layout


def _unflatten_optimizer_state(tensors: dict[str, Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `_flatten_optimizer_state`: a dict for `optimizer.load_state_dict`."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in layout["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": layout["param_groups"]}


class CheckpointStore:
    """Versioned checkpoints in one directory, newest `keep` kept.

    Args:
        directory: where the files live (created if missing). Temp files left by a crashed
            writer are removed on construction.
        keep: how many versions to keep (>= 1); older ones are deleted after each save.
        read_only: for a process that only reads a directory another process writes (a server
            replica following the trainer): the store never creates, writes, prunes or removes
            anything (leftover temp files in a shared directory are the writer's saves in flight,
            and the directory may be mounted read-only); `save` raises `PermissionError`.
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 5, *, read_only: bool = False) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.read_only = read_only
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_temp_files()

    def _paths(self, version: int) -> tuple[Path, Path, Path]:
        stem = self.directory / f"ckpt-{version:08d}"
        return Path(f"{stem}.safetensors"), Path(f"{stem}.optim.safetensors"), Path(f"{stem}.json")

    def _training_path(self, version: int) -> Path:
        return self.directory / f"ckpt-{version:08d}.training.safetensors"

    def _remove_temp_files(self) -> None:
        for path in self.directory.glob(_TEMP_PREFIX + "*"):
            logger.warning("removing leftover temp file %s", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def save(
        self,
        state_dict: dict[str, Tensor],
        meta: dict[str, Any],
        optimizer_state: dict[str, Any] | None = None,
        training_weights: dict[str, Tensor] | None = None,
    ) -> CheckpointInfo:
        """Write checkpoint `meta["version"]` atomically, then prune to the newest `keep`.

        Args:
            state_dict: model tensors (any device; saved from CPU copies): the served weights.
            meta: JSON-able dict with at least `version` (int >= 0); `step`, `model`,
                `num_classes`, `class_names`, `config` are conventional.
            optimizer_state: `optimizer.state_dict()`, or None.
            training_weights: the raw weights the optimizer trains when they differ from
                `state_dict` (an EMA serves), or None.

        Returns:
            CheckpointInfo of the saved version.

        Raises:
            PermissionError: the store is read-only.
        """
        if self.read_only:
            raise PermissionError(f"{self.directory}: read-only checkpoint store, cannot save")
        version = meta.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 10**8:
            raise ValueError(f"meta['version'] must be an int in [0, 1e8), got {version!r}")
        weights_path, optim_path, sidecar_path = self._paths(version)
        training_path = self._training_path(version)
        weights = _serialise(state_dict)
        files = {"weights": _file_entry(weights_path, weights)}
        optimizer_layout = None
        if optimizer_state is not None:
            optim_tensors, optimizer_layout = _flatten_optimizer_state(optimizer_state)
            optim = safetensors.torch.save(optim_tensors)
            files["optimizer"] = _file_entry(optim_path, optim)
        if training_weights is not None:
            training = _serialise(training_weights)
            files["training_weights"] = _file_entry(training_path, training)
        sidecar = {
            "format": FORMAT,
            "meta": meta,
            "created": datetime.now(UTC).isoformat(),
            "files": files,
            "optimizer_layout": optimizer_layout,
        }
        sidecar_bytes = json.dumps(sidecar, indent=2, sort_keys=True).encode()  # fails before any write
        atomic_write(weights_path, weights, _TEMP_PREFIX)
        if optimizer_state is not None:
            atomic_write(optim_path, optim, _TEMP_PREFIX)
        else:
            optim_path.unlink(missing_ok=True)
        if training_weights is not None:
            atomic_write(training_path, training, _TEMP_PREFIX)
        else:
            training_path.unlink(missing_ok=True)
        atomic_write(sidecar_path, sidecar_bytes, _TEMP_PREFIX)
        self._prune()
        return self._info(sidecar_path, sidecar)

    def _info(self, sidecar_path: Path, sidecar: dict[str, Any]) -> CheckpointInfo:
        meta = sidecar["meta"]
        optimizer = sidecar["files"].get("optimizer")
        training = sidecar["files"].get("training_weights")
        return CheckpointInfo(
            version=int(meta["version"]),
            step=int(meta.get("step", 0)),
            created=sidecar["created"],
            sidecar=sidecar_path,
            weights=self.directory / sidecar["files"]["weights"]["name"],
            optimizer=self.directory / optimizer["name"] if optimizer else None,
            training_weights=self.directory / training["name"] if training else None,
            meta=meta,
        )

    def _read_sidecar(self, path: Path) -> dict[str, Any]:
        try:
            sidecar = json.loads(path.read_bytes())
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path}: no such checkpoint") from exc
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable sidecar ({exc})") from exc
        try:
            valid = (
                sidecar["format"] == FORMAT
                and int(sidecar["meta"]["version"]) == _version_of(path)
                and isinstance(sidecar["files"]["weights"]["name"], str)
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed sidecar ({exc!r})") from exc
        if not valid:
            raise CheckpointError(f"{path}: wrong format or version")
        return sidecar

    def versions(self) -> list[CheckpointInfo]:
        """Checkpoints whose sidecar parses, oldest first (data files are verified only on load)."""
        infos = []
        for path in sorted(self.directory.glob("ckpt-*.json")):
            try:
                infos.append(self._info(path, self._read_sidecar(path)))
            except CheckpointError as exc:
                logger.warning("ignoring checkpoint: %s", exc)
        return sorted(infos, key=lambda info: info.version)

    def file_versions(self) -> set[int]:
        """Every version a checkpoint file names, torn, corrupt and temp-less partial ones included (the
        numbers a writer has used)."""
        return {v for v in map(_version_of, self.directory.glob("ckpt-*")) if v is not None}

    def _read_verified(self, entry: dict[str, Any]) -> bytes:
        path = self.directory / entry["name"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc})") from exc
        if len(data) != entry["size"] or _sha256(data) != entry["sha256"]:
            raise CheckpointError(f"{path}: size or sha256 does not match the sidecar (truncated or corrupt)")
        return data

    def load(self, version: int) -> LoadedCheckpoint:
        """Load checkpoint `version`, verifying every file's size and sha256.

        Returns:
            LoadedCheckpoint(state_dict (CPU tensors), meta, optimizer_state or None,
            training_weights or None).

        Raises:
            CheckpointError: missing, truncated or corrupt files.
        """
        sidecar = self._read_sidecar(self._paths(version)[2])
        files = sidecar["files"]
        try:
            state_dict = safetensors.torch.load(self._read_verified(files["weights"]))
            optimizer_state = None
            if "optimizer" in files:
                optim_tensors = safetensors.torch.load(self._read_verified(files["optimizer"]))
                optimizer_state = _unflatten_optimizer_state(optim_tensors, sidecar["optimizer_layout"])
            training_weights = None
            if "training_weights" in files:
                training_weights = safetensors.torch.load(self._read_verified(files["training_weights"]))
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"checkpoint {version}: cannot decode ({exc})") from exc
        return LoadedCheckpoint(state_dict, sidecar["meta"], optimizer_state, training_weights)

    def load_latest(self) -> LoadedCheckpoint | None:
        """The newest checkpoint that loads and verifies; corrupt newer ones are skipped (logged).

        Returns:
            LoadedCheckpoint, or None when the directory holds no loadable checkpoint.
        """
        for info in reversed(self.versions()):
            try:
                return self.load(info.version)
            except CheckpointError as exc:
                logger.warning("skipping checkpoint %d: %s", info.version, exc)
        return None

    def pinned(self) -> set[int]:
        """The pinned versions (kept by pruning); an unreadable pins file is logged and read as none."""
        try:
            return {int(v) for v in json.loads((self.directory / PINS_NAME).read_bytes())["pinned"]}
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("%s: unreadable pins file (%s)", self.directory / PINS_NAME, exc)
            return set()

    def pin(self, version: int) -> None:
        """Protect saved `version` from pruning (persisted).

        Raises:
            CheckpointError: no checkpoint `version` (its sidecar must parse).
            PermissionError: the store is read-only.
        """
        if self.read_only:
            raise PermissionError(f"{self.directory}: read-only checkpoint store, cannot pin")
        if version not in {info.version for info in self.versions()}:
            raise CheckpointError(f"no saved version {version} to pin")
        self._write_pins(self.pinned() | {version})

    def unpin(self, version: int) -> bool:
        """Let `version` be pruned again (at the next save); False when it was not pinned."""
        if self.read_only:
            raise PermissionError(f"{self.directory}: read-only checkpoint store, cannot unpin")
        pins = self.pinned()
        if version not in pins:
            return False
        self._write_pins(pins - {version})
        return True

    def _write_pins(self, pins: set[int]) -> None:
        atomic_write(self.directory / PINS_NAME, json.dumps({"pinned": sorted(pins)}).encode(), _TEMP_PREFIX)

    def _prune(self) -> None:
        """Delete every file of versions older than the newest `keep` valid ones, except pinned ones."""
        infos = self.versions()
        if len(infos) <= self.keep:
            return
        cutoff = infos[-self.keep].version
        pinned = self.pinned()
        # sidecars first, so a half-deleted version is never listed
        for path in sorted(self.directory.glob("ckpt-*"), key=lambda p: p.suffix != ".json"):
            version = _version_of(path)
            if version is not None and version < cutoff and version not in pinned:
                path.unlink(missing_ok=True)
