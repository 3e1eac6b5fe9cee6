"""Export a trained SSD for other runtimes: ONNX (ONNX Runtime, TensorRT, ...) and TorchScript (libtorch).

The exported network takes normalised images `images` [B, 3, S, S] (B dynamic; RGB pixels in 0-255
minus `pixel_mean`, divided by `pixel_std`, resized to S x S) and returns three outputs:

* `loc` [B, P, 4]: offsets from the priors (decode with `variance`, see `ssd_core.ops.coder.decode`);
* `conf` [B, P, C]: raw class logits, background (column 0) included;
* `priors` [P, 4]: the default boxes in normalised (cx, cy, w, h) — a constant, shipped inside the
  file so that it is self-contained.

The file also carries the metadata a runtime needs to prepare inputs and decode outputs (`metadata`):
ONNX as `metadata_props`, TorchScript as the extra file `metadata.json`. Post-processing (decoding,
NMS) is not part of the graph: runtimes bring their own, and the score threshold stays a caller's choice.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ssd_core.models import SSD

__all__ = ["FORMATS", "ONNX_WEIGHT_PREFIX", "SUFFIXES", "export_model", "metadata", "onnx_model", "optimize_onnx", "read_torchscript_metadata"]

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
TORCHSCRIPT_METADATA = "metadata.json"
EXAMPLE_BATCH = 2  # traced/exported with B = 2; the batch axis stays dynamic
ONNX_OPSET = 18


class _Exported(nn.Module):
    """The network with its input named `images` (the name of the exported input)."""

    def __init__(self, model: SSD) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.model(images)  # [B, P, 4], [B, P, C], [P, 4]


def metadata(model: SSD, version: int | None = None, class_names: Sequence[str] | None = None) -> dict[str, str]:
    """What a runtime needs besides the graph, as strings (JSON for lists).

    Returns:
        keys `model`, `version`, `num_classes`, `class_names` (object classes, background excluded),
        `image_size`, `pixel_mean`, `pixel_std` (RGB, 0-255 units), `variance`, `inputs`, `outputs`.
    """
    spec = model.spec
    names = list(class_names) if class_names else [f"class_{i}" for i in range(spec.num_classes - 1)]
    return {
        "model": spec.name,
        "version": "" if version is None else str(version),
        "num_classes": str(spec.num_classes),
        "class_names": json.dumps(names),
        "image_size": str(spec.image_size),
        "pixel_mean": json.dumps(list(spec.pixel_mean)),
        "pixel_std": json.dumps(list(spec.pixel_std)),
        "variance": json.dumps(list(spec.prior_config.variance)),
        "inputs": "images [B, 3, S, S] float32: (rgb - pixel_mean) / pixel_std, resized to S x S",
        "outputs": "loc [B, P, 4] offsets; conf [B, P, C] logits (background column 0); priors [P, 4] cx, cy, w, h",
    }


def export_model(model: SSD, path: str | Path, fmt: str, meta: dict[str, str] | None = None) -> Path:
    """Write `model` (left untouched: an eval-mode CPU copy is exported) to `path`.

    Args:
        fmt: `onnx` or `torchscript`.
        meta: stored in the file (default `metadata(model)`).

    Returns:
        the path written.

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network = _Exported(copy.deepcopy(model).cpu().eval()).eval()
    size = model.spec.image_size
    example = torch.zeros(EXAMPLE_BATCH, 3, size, size)
    meta = meta or metadata(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer/exporter chatter about the shape check in SSD.forward
        if fmt == "onnx":
            _export_onnx(network, example, path, meta)
        else:
            _export_torchscript(network, example, path, meta)
    return path


# the ONNX optimizer's loggers: ~20 INFO lines (and a WARNING about the priors output) per export
ONNX_OPTIMIZER_LOGGERS = ("onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet(logger_names: Sequence[str], level: int = logging.ERROR) -> Iterator[None]:
    """Raise the level of `logger_names` to `level` for the block (a server's log would list every pass)."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, previous in zip(loggers, levels, strict=True):
            logger.setLevel(previous)


def onnx_model(model: SSD, optimize: bool = True):
    """`model` (left untouched) as an in-memory `onnx.ModelProto`, the graph `export_model` writes without its
    metadata.

    Args:
        optimize: fold constants (BatchNorm into the convolutions) as the written file does; False keeps every
            weight and BatchNorm statistic an initializer named `ONNX_WEIGHT_PREFIX` + its state_dict key, so that
            the same graph can run other weights of the architecture.
    """
    network = _Exported(copy.deepcopy(model).cpu().eval()).eval()
    size = model.spec.image_size
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer/exporter chatter about the shape check in SSD.forward
        return _onnx_proto(network, torch.zeros(EXAMPLE_BATCH, 3, size, size), optimize)


ONNX_WEIGHT_PREFIX = "model."  # the exported module holds the network as its attribute `model`


def optimize_onnx(proto):
    """The optimisation `onnx_model(optimize=True)` applies (constant folding: BatchNorm into the convolutions,
    shape arithmetic removed), on an in-memory `onnx.ModelProto`, e.g. `onnx_model(optimize=False)` with other
    weights put in; a new proto."""
    import onnxscript

    with _quiet(ONNX_OPTIMIZER_LOGGERS):
        return onnxscript.optimizer.optimize(proto)


def _onnx_proto(network: nn.Module, example: Tensor, optimize: bool):
    with _quiet(ONNX_OPTIMIZER_LOGGERS):
        program = torch.onnx.export(
            network, (example,), None, input_names=["images"], output_names=["loc", "conf", "priors"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
            opset_version=ONNX_OPSET, dynamo=True, optimize=optimize, verbose=False,
        )
    return program.model_proto


def _export_onnx(network: nn.Module, example: Tensor, path: Path, meta: dict[str, str]) -> None:
    import onnx  # imported here: the rest of the library does not need it

    proto = _onnx_proto(network, example, optimize=True)
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def _export_torchscript(network: nn.Module, example: Tensor, path: Path, meta: dict[str, str]) -> None:
    traced = torch.jit.trace(network, (example,), check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(meta)})


def read_torchscript_metadata(path: str | Path) -> dict[str, str]:
    """The metadata stored in an exported TorchScript file."""
    extra = {TORCHSCRIPT_METADATA: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[TORCHSCRIPT_METADATA])
