"""The JSON meta of an `ssd` checkpoint, shared by `ssd train`, `ssd import` and the service.

Keys: `version`, `step`, `model` (architecture name), `num_classes` (background included), `priors`
(prior set), `class_names` (object classes in label order), then the writer's extra keys (`config` and
`world_size` from `ssd train`, `imported_from` and `imported_tensors` from `ssd import`, `restored_from`
from the service).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ssd_core.models.build import LEGACY_PRIOR_SETS
from ssd_core.storage.checkpoint import CheckpointError, CheckpointStore
from ssd_core.storage.version_numbers import highest_issued

if TYPE_CHECKING:
    from ssd_core.models.base import SSD

__all__ = ["checkpoint_meta", "next_version", "recorded_priors"]


def next_version(store: CheckpointStore) -> int:
    """The version a new checkpoint in `store` gets: one past any number the directory has seen (its
    checkpoints, torn ones included, and the service's version mark), 1 in an empty store."""
    return highest_issued(store) + 1


def checkpoint_meta(model: SSD, class_names: Sequence[str], version: int, step: int, extra: dict | None = None) -> dict:
    """The meta of a checkpoint of `model` after `step` training steps; `extra` adds keys."""
    return {
        "version": version,
        "step": step,
        "model": model.spec.name,
        "num_classes": model.spec.num_classes,
        "priors": model.spec.prior_set,
        "class_names": list(class_names),
        **(extra or {}),
    }


def recorded_priors(meta: Mapping[str, Any], default_model: str | None = None) -> str:
    """The prior set a checkpoint was trained with.

    A checkpoint written before the prior set was recorded has its architecture's original priors
    (`LEGACY_PRIOR_SETS`: VOC for the VGG models): those of the meta's `model`, else of `default_model`.

    Raises:
        CheckpointError: the meta records neither a prior set nor a known architecture.
    """
    if "priors" in meta:
        return meta["priors"]
    model = meta.get("model", default_model)
    if model not in LEGACY_PRIOR_SETS:
        raise CheckpointError(f"checkpoint meta records no priors and no known model (model={model!r})")
    return LEGACY_PRIOR_SETS[model]
