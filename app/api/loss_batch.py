"""The loss's own inputs -> `LossBatch`: the predictions form of `/score-loss` (JSON), its safetensors
form (`application/octet-stream`) and the Open Inference Protocol's `ssd-loss` tensors. Every problem
becomes an `ApiError` naming the field; the checks of labels and boxes are `app.api.inputs`'."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from pydantic import TypeAdapter
from starlette.requests import Request
from torch import Tensor

from app.api.errors import ApiError, invalid
from app.api.inputs import check_bkg_label, check_boxes, check_label, check_labelled_classes, validate_as
from app.api.schemas import LossOptions, ScoreLossRequest
from app.core.settings import Settings
from ssd_core.loss.partial_labels import labelled_class_mask
from ssd_core.ops.box_formats import check_pixel_boxes

# ---- predictions form of /score-loss

_NORMALISED = {"min_size": 0.0, "tolerance": None}  # boxes in [0, 1]: no pixel size or overhang rule


@dataclass
class LossBatch:
    """What the loss is computed on.

    Attributes:
        loc (Tensor[B, P, 4]), conf (Tensor[B, P, C]), priors (Tensor[P, 4]) cxcywh, targets (Tensor[B, M, 6])
        padded, normalised (x1, y1, x2, y2, label, difficult), label < 0 = padding; options for the loss;
        class_mask (Tensor[B, C] bool) of partial labels or None.
    """

    loc: Tensor
    conf: Tensor
    priors: Tensor
    targets: Tensor
    options: LossOptions
    class_mask: Tensor | None = None


def _tensor(values: list, field: str, expected: str) -> Tensor:
    try:
        return torch.tensor(values, dtype=torch.float32)
    except (ValueError, TypeError) as error:  # ragged nesting
        raise invalid(field, f"must be a rectangular {expected} array ({error})") from None


def predictions_batch(request: ScoreLossRequest, model_priors: Tensor, settings: Settings) -> LossBatch:
    """The JSON prediction form -> LossBatch, checked against the model's priors and classes."""
    assert request.predictions is not None and request.targets is not None  # the schema's form check
    loc = request.predictions.loc
    if not loc:
        raise invalid("predictions.loc", "the batch is empty")
    for b, rows in enumerate(loc):
        if len(rows) != len(loc[0]):
            raise invalid(f"predictions.loc[{b}]", f"has {len(rows)} priors, predictions.loc[0] has {len(loc[0])}")
    targets = []
    for b, boxes in enumerate(request.targets):
        for i, t in enumerate(boxes):  # before the tensor: an int past float range must be a 422, not a 500
            check_label(t.label, settings.num_classes, f"targets[{b}][{i}].label")
        rows = [[*t.box, t.label, float(t.difficult)] for t in boxes]
        targets.append(torch.tensor(rows, dtype=torch.float32).reshape(-1, 6))  # [n_b, 6]
    priors = None if request.priors is None else _tensor(request.priors, "priors", "[P][4]")
    padded = _pad(targets)
    batch = check_batch(
        _tensor(loc, "predictions.loc", "[B][P][4]"),
        _tensor(request.predictions.conf, "predictions.conf", "[B][P][C]"),
        priors, padded, request.options, model_priors, settings, "predictions.",
    )
    batch.class_mask = batch_class_mask(request.labelled_classes, padded, request.options, settings,
                                        "labelled_classes", lambda b, i: f"targets[{b}][{i}].label")
    return batch


def _pad(targets: list[Tensor]) -> Tensor:
    """[n_b, 6] per image -> Tensor[B, M, 6], padding rows label -1 (M >= 1)."""
    batch = torch.full((len(targets), max([1, *(len(t) for t in targets)]), 6), -1.0)
    for b, rows in enumerate(targets):
        batch[b, : len(rows)] = rows
    return batch


def batch_class_mask(
    labelled: Sequence[Sequence[int] | None] | None, targets: Tensor, options: LossOptions, settings: Settings,
    field: str, box_field: Callable[[int, int], str],
) -> Tensor | None:
    """Per-image partial labels of a predictions batch -> the loss's class mask [B, C] (None: nothing declared).

    Args:
        targets (Tensor[B, M, 6]): padded; box i of image b is row i (padding rows skipped).
        field: where the list lives (422 names `field`, `field[b][j]`); box_field(b, i): a box's label.
    """
    if labelled is None:
        return None
    if len(labelled) != len(targets):
        raise invalid(field, f"has {len(labelled)} entries for {len(targets)} images")
    for b, declared in enumerate(labelled):
        rows = (targets[b, :, 4] >= 0).nonzero().flatten().tolist()  # real boxes of image b
        labels = targets[b, rows, 4].tolist()
        check_labelled_classes(declared, labels, settings.num_classes, f"{field}[{b}]",
                               lambda k, b=b, rows=rows: box_field(b, rows[k]))
    return labelled_class_mask(labelled, settings.num_classes, options.bkg_label)


def check_batch(
    loc: Tensor, conf: Tensor, priors: Tensor | None, targets: Tensor, options: LossOptions,
    model_priors: Tensor, settings: Settings, prefix: str,
) -> LossBatch:
    """Shapes, finiteness, classes and boxes of a loss batch; `prefix` is where loc/conf live."""
    if loc.dim() != 3 or loc.shape[-1] != 4:
        raise invalid(f"{prefix}loc", f"must be [B][P][4], got shape {list(loc.shape)}")
    batch, num_priors = loc.shape[:2]
    if batch == 0:
        raise invalid(f"{prefix}loc", "the batch is empty")
    if batch > settings.max_images_per_request:
        raise invalid(f"{prefix}loc", f"batch of {batch} exceeds the limit of {settings.max_images_per_request} "
                      "(SSD_MAX_IMAGES_PER_REQUEST)")
    if conf.dim() != 3 or conf.shape[:2] != loc.shape[:2]:
        raise invalid(f"{prefix}conf", f"must be [B={batch}][P={num_priors}][C], got shape {list(conf.shape)}")
    if conf.shape[-1] != settings.num_classes:
        raise invalid(f"{prefix}conf", f"has {conf.shape[-1]} classes, the model has num_classes={settings.num_classes}")
    priors_field = "priors" if priors is not None else f"{prefix}loc"
    priors = model_priors.cpu() if priors is None else priors
    if priors.dim() != 2 or priors.shape != (num_priors, 4):
        raise invalid(priors_field, f"P={num_priors} predictions do not match priors of shape {list(priors.shape)}")
    if not (priors[:, 2:] > 0).all():
        raise invalid("priors", "every prior needs a positive width and height")
    for name, tensor in (("loc", loc), ("conf", conf), ("priors", priors)):
        index = _first_non_finite(tensor)
        if index is not None:
            raise invalid(name if name == "priors" else f"{prefix}{name}", f"holds a non-finite number at {index}")
    if targets.shape[0] != batch:
        raise invalid("targets", f"has {targets.shape[0]} images, the predictions have B={batch}")
    check_bkg_label(options, settings)
    real = targets[..., 4] >= 0  # [B, M]
    try:  # one check of all real boxes; per image only to name the failing one
        if int(real.sum(dim=1).max()) > settings.max_boxes_per_image:
            raise ValueError("too many boxes")
        check_pixel_boxes(targets[real][:, :4], (1, 1), **_NORMALISED)
    except ValueError as error:
        for b in range(batch):
            check_boxes(targets[b][real[b]][:, :4], (1, 1), f"targets[{b}]", settings, **_NORMALISED)  # [n_b, 4]
        raise invalid("targets", str(error)) from None
    return LossBatch(loc, conf, priors, targets, options)


def _first_non_finite(tensor: Tensor) -> list[int] | None:
    """Index of the first NaN/inf element, or None. The sum is a cheap test: it is finite when every
    element is (an overflowing sum of finite values falls through to the exact check)."""
    if torch.isfinite(tensor.sum()):
        return None
    bad = (~torch.isfinite(tensor)).nonzero()
    return [int(i) for i in bad[0]] if len(bad) else None


# ---- safetensors form of /score-loss

_TENSORS = {"loc", "conf", "targets", "priors"}
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


async def receive_chunks(request: Request) -> list[bytes]:
    """The request body as received, chunk by chunk: the event loop only collects them; `joined` copies them
    into one buffer on a worker thread."""
    return [chunk async for chunk in request.stream() if chunk]


def joined(chunks: list[bytes]) -> bytearray:
    """`receive_chunks`'s chunks in one writable buffer (one copy, on the worker thread; the body is held twice
    while it is made, at most 2 x SSD_MAX_BODY_BYTES), so tensors can be views of it (`torch.frombuffer` wants it
    writable)."""
    return bytearray().join(chunks)


def safetensors_batch(body: bytes | bytearray, model_priors: Tensor, settings: Settings) -> LossBatch:
    """A safetensors body (loc, conf, targets [B, M, 5|6] padded, optional priors; options as JSON
    strings in `__metadata__`) -> LossBatch. The header is checked before any tensor is built; float32
    tensors of a bytearray body are views of it, not copies."""
    header = _safetensors_header(body)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if name not in _TENSORS:
            raise invalid(name, f"unknown tensor; expected {sorted(_TENSORS)}")
        if not isinstance(entry, dict) or entry.get("dtype") not in _FLOAT_DTYPES:
            raise invalid(name, f"dtype must be one of {sorted(_FLOAT_DTYPES)}")
    for name in ("loc", "conf", "targets"):
        if name not in header:
            raise invalid(name, "missing tensor")
    tensors = _safetensors_views(body, header)
    metadata, labelled = header.get("__metadata__") or {}, None
    if isinstance(metadata, dict) and "labelled_classes" in metadata:
        metadata = {key: text for key, text in metadata.items() if key != "labelled_classes"}
        labelled = _metadata_labelled_classes(header["__metadata__"]["labelled_classes"])
    return tensor_batch(tensors, _metadata_options(metadata), model_priors, settings, labelled,
                        "__metadata__.labelled_classes")


def tensor_batch(
    tensors: dict[str, Tensor], options: LossOptions, model_priors: Tensor, settings: Settings,
    labelled: Sequence[Sequence[int] | None] | None = None, labelled_field: str = "labelled_classes",
) -> LossBatch:
    """Named tensors (the safetensors body, the protocol's `ssd-loss` inputs) -> LossBatch.

    Args:
        tensors: `loc` [B, P, 4], `conf` [B, P, C], `targets` [B, M, 5|6] padded (normalised x1, y1, x2, y2,
            label, optional difficult; label < 0 pads), optional `priors` [P, 4] (cx, cy, w, h).
        labelled: per image, its partial labels (0-based object classes) or None; errors name `labelled_field`.
    """
    targets = tensors["targets"].float()
    if targets.dim() != 3 or targets.shape[-1] not in (5, 6):
        raise invalid("targets", f"must be padded [B, M, 5|6], got shape {list(targets.shape)}")
    if targets.shape[-1] == 5:
        targets = torch.cat((targets, targets.new_zeros((*targets.shape[:2], 1))), dim=-1)  # [B, M, 6]
    if not torch.isfinite(targets).all():
        raise invalid("targets", "holds a non-finite number")
    real = targets[..., 4] >= 0  # [B, M]
    labels = targets[..., 4][real]  # [N]
    if ((labels != labels.round()) | (labels > settings.num_classes - 2)).any():  # name the first one
        for b, i in real.nonzero().tolist():
            check_label(float(targets[b, i, 4]), settings.num_classes, f"targets[{b}][{i}]")
    priors = tensors.get("priors")
    batch = check_batch(
        tensors["loc"].float(), tensors["conf"].float(), None if priors is None else priors.float(),
        targets, options, model_priors, settings, "",
    )
    batch.class_mask = batch_class_mask(labelled, targets, options, settings, labelled_field,
                                        lambda b, i: f"targets[{b}][{i}]")
    return batch


def _bad_safetensors(message: str) -> ApiError:
    return ApiError(400, "invalid_safetensors", f"body is not valid safetensors: {message}", "body")


def _safetensors_views(body: bytes | bytearray, header: dict) -> dict[str, Tensor]:
    """The header's tensors (float dtypes, already checked) over the body's bytes, after the checks of
    safetensors' own loader: every shape's byte size equals its offsets' span, and the spans tile the
    data section in order, from 0 to its end. Views of a bytearray body, copies of a bytes one."""
    data_start = 8 + int.from_bytes(body[:8], "little")
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    for name, entry in entries.items():
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _bad_safetensors(f"{name}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise _bad_safetensors(f"{name}: data_offsets must be two integers, got {offsets!r}")
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"]):
        start, end = entry["data_offsets"]
        if start != position or end < start:
            raise _bad_safetensors(f"{name}: data_offsets {[start, end]} leave a gap or overlap at byte {position}")
        size = math.prod(entry["shape"]) * _FLOAT_DTYPES[entry["dtype"]].itemsize
        if size != end - start:
            raise _bad_safetensors(f"{name}: shape {entry['shape']} needs {size} bytes, data_offsets give {end - start}")
        position = end
    if data_start + position != len(body):
        raise _bad_safetensors(f"the tensors cover {position} bytes, the data section holds {len(body) - data_start}")
    if isinstance(body, bytes):
        body = bytearray(body)  # torch.frombuffer needs a writable buffer
    buffer = torch.frombuffer(body, dtype=torch.uint8)  # [len(body)], not empty: the header was read
    tensors = {}
    for name, entry in entries.items():
        dtype = _FLOAT_DTYPES[entry["dtype"]]
        start, end = (data_start + offset for offset in entry["data_offsets"])
        raw = buffer[start:end]
        if start % dtype.itemsize:  # a header length that is not a multiple of 8: realign by copying
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(entry["shape"])
    return tensors


def _safetensors_header(body: bytes | bytearray) -> dict:
    bad = _bad_safetensors
    if len(body) < 8:
        raise bad("shorter than its 8-byte header length")
    length = int.from_bytes(body[:8], "little")
    if length > len(body) - 8:
        raise bad(f"header length {length} exceeds the {len(body) - 8} bytes that follow")
    try:
        header = json.loads(body[8 : 8 + length])
    except (ValueError, RecursionError) as error:  # RecursionError: nesting deeper than Python's stack
        raise bad(f"header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    return header


_OPTIONS = TypeAdapter(LossOptions)
_LABELLED_PER_IMAGE = TypeAdapter(list[list[int] | None])


def _metadata_labelled_classes(text: object) -> list[list[int] | None]:
    """`__metadata__["labelled_classes"]`: a JSON string of one list (or null) per image."""
    field = "__metadata__.labelled_classes"
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except (ValueError, RecursionError):
        raise invalid(field, "must be a JSON string of one list of labels (or null) per image") from None
    return validate_as(_LABELLED_PER_IMAGE, value, field)


def _metadata_options(metadata: dict) -> LossOptions:
    """`__metadata__` {option: JSON string} -> LossOptions (a bare string, e.g. bipartite, is itself)."""
    if not isinstance(metadata, dict):
        raise invalid("__metadata__", "must be a JSON object of strings")
    options = {}
    for key, text in metadata.items():
        try:
            options[key] = json.loads(text)
        except (TypeError, ValueError, RecursionError):
            options[key] = text
    return validate_as(_OPTIONS, options, "__metadata__")


