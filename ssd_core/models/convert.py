"""Import ssd.pytorch checkpoints: a full SSD state_dict or the VGG16 'reducedfc' base.

Files are read with `torch.load(weights_only=True)` only: a file that needs to unpickle
anything but tensors and containers is refused, never executed. The result is validated key by
key and shape by shape against a freshly built model and written as safetensors.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ssd_core.models import build_model
from ssd_core.ops.priors import resolve_prior_set

__all__ = ["IMPORTABLE_MODELS", "import_checkpoint", "load_ssd_pytorch", "ssd_pytorch_state_dict"]

IMPORTABLE_MODELS = ("ssd300", "ssd512")
_BASE_KEY = re.compile(r"\d+\.(weight|bias)")  # VGG16 reducedfc: keys of the bare `vgg` ModuleList
_WRAPPER_KEYS = ("state_dict", "model")  # training scripts that save {'state_dict': ..., 'epoch': ...}
_LISTED = 10  # offending keys named per category in error messages
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save: a zip archive; legacy (< 1.6): a pickle, protocol >= 2


def load_ssd_pytorch(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read an ssd.pytorch .pth safely.

    Args:
        path: a file written by `torch.save(state_dict)`.

    Returns:
        The tensors by key, 'module.' (DataParallel) prefixes removed; a {'state_dict': ...}
        or {'model': ...} wrapper is unwrapped.

    Raises:
        ValueError: the file is corrupt, holds pickled objects other than tensors, or holds no state_dict.
    """
    with open(path, "rb") as file:
        head = file.read(4)
    if not head.startswith(_TORCH_MAGIC):
        raise ValueError(
            f"{path}: not a PyTorch checkpoint: torch.save writes a zip archive (or, before torch 1.6, a "
            f"pickle), this file starts with {head!r}"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = re.search(r"GLOBAL (\S+)", str(exc))
        if culprit is None:  # not a refused class: the pickle itself is damaged or not torch's
            raise ValueError(f"{path}: not a readable PyTorch checkpoint (its pickle does not load)") from exc
        raise ValueError(
            f"{path}: refused: the file holds pickled objects other than tensors ({culprit.group(1)}) and is "
            "only read with torch.load(weights_only=True), which never runs a file's code"
        ) from exc
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError) as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({first_line})") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(
            f"{path}: expected a state_dict (a mapping of names to tensors), got {type(loaded).__name__}"
        )
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def ssd_pytorch_state_dict(
    state: Mapping[str, Tensor], model_name: str, num_classes: int
) -> dict[str, Tensor]:
    """Check ssd.pytorch weights against `build_model(model_name, num_classes)` and complete them.

    Args:
        state: a full SSD state_dict (`vgg.N.*`, `L2Norm.weight`, `extras.N.*`, `loc.N.*`,
            `conf.N.*`) or a VGG16 base (`N.weight`, `N.bias`), as from `load_ssd_pytorch`.
        model_name: 'ssd300' or 'ssd512'.
        num_classes: conf columns including background.

    Returns:
        A complete state_dict for the model: the given tensors (cast to the model's dtype); for a
        base, the other layers freshly initialised as `build_model` does (ssd.pytorch's recipe).

    Raises:
        ValueError: listing missing, unexpected and shape-mismatched keys.
    """
    if model_name not in IMPORTABLE_MODELS:
        raise ValueError(
            f"model_name must be one of {', '.join(IMPORTABLE_MODELS)} to import, got {model_name!r}"
        )
    model = build_model(model_name, num_classes)
    expected = model.state_dict()
    if state and all(_BASE_KEY.fullmatch(key) for key in state):
        state = {f"vgg.{key}": value for key, value in state.items()}
        _check(
            state, {k: v for k, v in expected.items() if k.startswith("vgg.")}, f"{model_name}'s VGG16 base"
        )
        return {**expected, **{k: v.to(expected[k].dtype).contiguous() for k, v in state.items()}}
    _check(
        state,
        expected,
        f"{model_name} with {num_classes} classes",
        model.spec.prior_config.boxes_per_location[0],
    )
    return {key: state[key].to(value.dtype).contiguous() for key, value in expected.items()}


def import_checkpoint(
    src: str | os.PathLike, model_name: str, num_classes: int, out_path: str | os.PathLike,
    prior_set: str | None = None,
) -> Path:
    """Convert an ssd.pytorch .pth (full SSD or VGG16 base) into this project's safetensors file.

    The file's metadata holds 'model' (name), 'num_classes', 'priors' (`prior_set`, default ssd.pytorch's
    rule: voc for 21 classes, else coco) and 'source'. Written to a
    temporary file and renamed, so `out_path` is never half-written.

    Returns:
        The path written.
    """
    state = ssd_pytorch_state_dict(load_ssd_pytorch(src), model_name, num_classes)
    out = Path(out_path)
    tmp = out.with_name(out.name + ".tmp")
    metadata = {
        "model": model_name,
        "num_classes": str(num_classes),
        "priors": resolve_prior_set(model_name, num_classes, prior_set),
        "source": f"ssd.pytorch:{Path(src).name}",
    }
    save_file(state, tmp, metadata=metadata)
    os.replace(tmp, out)
    return out


def _check(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor], target: str, conf0_boxes: int = 0
) -> None:
    """Raise ValueError naming what does not fit; `conf0_boxes` lets it tell the checkpoint's class count."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [
        f"{key} {list(state[key].shape)} (model: {list(value.shape)})"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:_LISTED])}{', ...' if len(items) > _LISTED else ''}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    hint = ""
    if conf0_boxes and "conf.0.weight" in state and "conf.0.weight" in expected:
        found = state["conf.0.weight"].shape[0] / conf0_boxes
        if found != expected["conf.0.weight"].shape[0] / conf0_boxes:
            hint = f" (the checkpoint's conf heads have {found:g} classes including background)"
    raise ValueError(f"checkpoint does not fit {target}: {'; '.join(problems)}{hint}")
