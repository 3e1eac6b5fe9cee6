"""A released weights file: a model's served weights as half-precision safetensors with a JSON card beside it.

`save_weights(state_dict, path, card)` writes `path` (floating tensors in float16, which halves the file
and loses no detection accuracy a test can see; integer buffers as they are) and `path.with_suffix(".json")`,
the card: what the weights are (architecture, classes, prior set), how they were made (the command) and
how good they are (held-out mAP). `load_weights` reads them back as float32; `read_card` reads the card.
Nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor

from ssd_core.storage.atomic import atomic_write

__all__ = ["card_path", "load_weights", "read_card", "save_weights"]

_TEMP_PREFIX = ".tmp-weights-"


def card_path(path: Path) -> Path:
    """The card of the weights file `path`: the same name with `.json`."""
    return Path(path).with_suffix(".json")


def save_weights(state_dict: dict[str, Tensor], path: Path, card: dict[str, Any]) -> Path:
    """Write `state_dict` in float16 to `path` and `card` beside it; returns the card's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: (tensor.half() if tensor.is_floating_point() else tensor).detach().cpu().contiguous()
        for name, tensor in state_dict.items()
    }
    atomic_write(path, safetensors.torch.save(tensors), _TEMP_PREFIX)
    card_file = card_path(path)
    atomic_write(card_file, (json.dumps(card, indent=1) + "\n").encode(), _TEMP_PREFIX)
    return card_file


def load_weights(path: Path) -> dict[str, Tensor]:
    """The state dict of a weights file, floating tensors as float32."""
    return {
        name: tensor.float() if tensor.is_floating_point() else tensor
        for name, tensor in safetensors.torch.load_file(path).items()
    }


def read_card(path: Path) -> dict[str, Any]:
    """The card beside the weights file `path` (empty when there is none)."""
    card_file = card_path(path)
    return json.loads(card_file.read_text()) if card_file.is_file() else {}

