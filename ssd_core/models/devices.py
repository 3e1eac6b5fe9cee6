"""Choosing the torch device from a user's setting (`auto`, `cpu`, `cuda`, `cuda:N`)."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(setting: str, source: str = "device") -> torch.device:
    """The device a setting names; `auto` is CUDA when available, else CPU.

    Args:
        setting: `auto`, `cpu`, `cuda` or `cuda:N`.
        source: how the user gave the setting (`--device`, `SSD_DEVICE`), used in the message.

    Raises:
        ValueError: CUDA was asked for and is not available.
    """
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{source}={setting}: CUDA is not available")
    return device
