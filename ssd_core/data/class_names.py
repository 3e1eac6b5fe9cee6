"""Named sets of object class names, defined once for the service (`SSD_CLASS_NAMES=shapes`) and the
`ssd` command (`--class-names voc`): the synthetic shapes and Pascal VOC's 20 classes."""

from __future__ import annotations

from collections.abc import Sequence

from ssd_core.data.datasets import VOC_CLASSES
from ssd_core.data.synthetic import CLASS_NAMES as SHAPES_CLASSES

__all__ = ["CLASS_NAME_PRESETS", "expand_class_names"]

CLASS_NAME_PRESETS: dict[str, tuple[str, ...]] = {"shapes": SHAPES_CLASSES, "voc": VOC_CLASSES}


def expand_class_names(names: Sequence[str]) -> list[str]:
    """Object class names in label order (background excluded): a single preset name (`shapes`, `voc`)
    stands for its names, anything else is taken as given."""
    if len(names) == 1 and names[0] in CLASS_NAME_PRESETS:
        return list(CLASS_NAME_PRESETS[names[0]])
    return list(names)
