"""Building an SSD network by name: `build_model('ssd300' | 'ssd512' | 'ssd-small', num_classes)`."""

from __future__ import annotations

from collections.abc import Callable

from ssd_core.models.base import SSD
from ssd_core.models.small import SSDSmall
from ssd_core.models.vgg import SSD300, SSD512
from ssd_core.ops.priors import resolve_prior_set

_BUILDERS: dict[str, Callable[..., SSD]] = {"ssd300": SSD300, "ssd512": SSD512, "ssd-small": SSDSmall}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
# checkpoints written before the prior set was recorded: the VGG models always had VOC priors then
LEGACY_PRIOR_SETS = {"ssd300": "voc", "ssd512": "voc", "ssd-small": "scaled"}


def build_model(name: str, num_classes: int, prior_set: str | None = None) -> SSD:
    """A freshly initialised SSD.

    Args:
        name: one of MODEL_NAMES.
        num_classes: conf columns including background (>= 2).
        prior_set: "voc" or "coco" for ssd300/ssd512; None follows ssd.pytorch's rule (VOC for 21
            classes, COCO otherwise; `priors.resolve_prior_set`). ssd-small has its own.

    Returns:
        SSD whose forward maps [B, 3, S, S] -> (loc [B, P, 4], conf [B, P, num_classes], priors [P, 4]),
        S = model.spec.image_size.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model name {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
    prior_set = resolve_prior_set(name, num_classes, prior_set)
    if name == "ssd-small":
        return SSDSmall(num_classes)
    return _BUILDERS[name](num_classes, prior_set)
