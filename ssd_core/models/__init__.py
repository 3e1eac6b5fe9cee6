"""The SSD networks, by name: `build_model('ssd300' | 'ssd512' | 'ssd-small', num_classes)`."""

from __future__ import annotations

from collections.abc import Callable

from ssd_core.models.base import SSD, ModelSpec
from ssd_core.models.small import SmallConfig, SSDSmall
from ssd_core.models.vgg import SSD300, SSD512

__all__ = ["MODEL_NAMES", "SSD", "SSD300", "SSD512", "ModelSpec", "SSDSmall", "SmallConfig", "build_model"]

_BUILDERS: dict[str, Callable[[int], SSD]] = {"ssd300": SSD300, "ssd512": SSD512, "ssd-small": SSDSmall}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int) -> SSD:
    """A freshly initialised SSD.

    Args:
        name: one of MODEL_NAMES.
        num_classes: conf columns including background (>= 2).

    Returns:
        SSD whose forward maps [B, 3, S, S] -> (loc [B, P, 4], conf [B, P, num_classes], priors [P, 4]),
        S = model.spec.image_size.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model name {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
    return _BUILDERS[name](num_classes)
