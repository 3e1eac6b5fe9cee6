"""The demo model shipped in the package: `ssd-small` trained on the synthetic shapes (`ShapesDataset`).

`DEMO_WEIGHTS` is a weights file (`ssd_core.storage.weights_file`: float16 safetensors) with its card
beside it (`ssd-small-shapes.json`: the `ssd train` command that made it and its held-out mAP@0.5). The
service serves it with `SSD_WEIGHTS=demo`, which `make serve` sets when no model is chosen.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_CLASS_NAMES", "DEMO_MODEL", "DEMO_NUM_CLASSES", "DEMO_WEIGHTS", "DEMO_WEIGHTS_NAME"]

DEMO_WEIGHTS_NAME = "demo"  # the value of SSD_WEIGHTS that stands for DEMO_WEIGHTS
DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights" / "ssd-small-shapes.safetensors"
DEMO_MODEL = "ssd-small"
DEMO_NUM_CLASSES = 4  # rectangle, ellipse, triangle and background
DEMO_CLASS_NAMES = "shapes"  # the class-name preset of the synthetic data set
