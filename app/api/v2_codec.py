"""Tensors of the Open Inference Protocol (KServe v2 REST) <-> numpy arrays.

An inference request is a JSON object `{"id", "parameters", "inputs": [{"name", "shape", "datatype",
"parameters", "data"}], "outputs": [{"name", "parameters"}]}`. With the binary tensor data extension
the body is that JSON (its length in bytes in the `Inference-Header-Content-Length` header) followed
by the raw bytes of every input whose `parameters.binary_data_size` is set, in input order: numbers
little-endian row-major, BYTES as a 4-byte little-endian length before each element. Outputs travel
the same way: binary when the output asks for `"binary_data": true` (or, when none are named, when the
request parameter `binary_data_output` is true), JSON `data` (row-major, flat) otherwise.

Framework-free: errors are `CodecError` with a message naming the offending input or output.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "DATATYPES",
    "CodecError",
    "InferRequest",
    "RequestedOutput",
    "datatype_of",
    "encode_infer_response",
    "parse_infer_request",
]

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items() if name != "BYTES"}
HEADER_LENGTH = "Inference-Header-Content-Length"


class CodecError(ValueError):
    """The request cannot be read as protocol tensors; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Input(_Strict):
    name: str
    shape: list[int] = Field(description="dimensions, each >= 0")
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class _Output(_Strict):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class _Request(_Strict):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[_Input]
    outputs: list[_Output] | None = None


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client named, and whether it wants it as binary data."""

    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request.

    Attributes:
        inputs: name -> array of the declared shape (BYTES: dtype object, elements `bytes`).
        parameters: the request-level parameters (e.g. model options).
        outputs: the outputs asked for, None for all of them.
        binary_output: the request's `binary_data_output` (the default for outputs not naming `binary_data`).
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    outputs: list[RequestedOutput] | None
    binary_output: bool


def _flag(parameters: dict[str, Any], name: str, where: str) -> bool | None:
    value = parameters.get(name)
    if value is not None and not isinstance(value, bool):
        raise CodecError(f"{where}.parameters.{name} must be true or false, got {value!r}")
    return value


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Decode a JSON or binary-extension request body.

    Args:
        body: the HTTP body.
        header_length: the `Inference-Header-Content-Length` header (None: the body is all JSON).

    Raises:
        CodecError: malformed JSON, unknown datatypes, shapes that do not match the data, short or
            trailing binary data, duplicate input names.
    """
    header, binary = _split(body, header_length)
    try:
        request = _Request.model_validate(json.loads(header))
    except (ValueError, RecursionError) as error:  # ValidationError is a ValueError
        raise CodecError(f"inference request header: {_describe(error)}") from None
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in request.inputs:
        if spec.name in inputs:
            raise CodecError(f"input {spec.name!r} is given twice")
        array, offset = _input_array(spec, binary, offset)
        inputs[spec.name] = array
    if offset != len(binary):
        raise CodecError(f"{len(binary) - offset} bytes of binary data follow the last binary input")
    default = bool(_flag(request.parameters, "binary_data_output", "request"))
    outputs = None
    if request.outputs is not None:
        outputs = []
        for out in request.outputs:
            binary_flag = _flag(out.parameters, "binary_data", f"output {out.name!r}")
            outputs.append(RequestedOutput(out.name, default if binary_flag is None else binary_flag))
    return InferRequest(request.id, inputs, request.parameters, outputs, default)


def _describe(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return f"{where}: {first['msg']}"
    return f"not valid JSON ({error})"


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.strip().isdigit() or int(header_length) > len(body):
        raise CodecError(f"{HEADER_LENGTH} must be a byte count within the {len(body)}-byte body, got {header_length!r}")
    length = int(header_length)
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def _input_array(spec: _Input, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """The input's array and the offset after its binary data."""
    where = f"input {spec.name!r}"
    dtype = DATATYPES.get(spec.datatype)
    if dtype is None:
        raise CodecError(f"{where}: datatype {spec.datatype!r} is not one of {', '.join(DATATYPES)}")
    if any(d < 0 for d in spec.shape):
        raise CodecError(f"{where}: shape {spec.shape} has a negative dimension")
    count = prod(spec.shape)
    size = spec.parameters.get("binary_data_size")
    if size is None:
        if spec.data is None:
            raise CodecError(f"{where}: neither `data` nor parameters.binary_data_size is given")
        return _json_array(spec.data, dtype, spec.shape, count, where), offset
    if spec.data is not None:
        raise CodecError(f"{where}: has both `data` and parameters.binary_data_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
        raise CodecError(f"{where}: binary_data_size {size!r} exceeds the {len(binary) - offset} bytes left")
    raw = binary[offset : offset + size]
    if dtype == DATATYPES["BYTES"]:
        array = _bytes_elements(raw, count, where)
    else:
        if size != count * dtype.itemsize:
            raise CodecError(f"{where}: {size} bytes for shape {spec.shape} of {spec.datatype} "
                             f"({count * dtype.itemsize} expected)")
        array = np.frombuffer(raw, dtype=dtype)
    return array.reshape(spec.shape), offset + size


def _json_array(data: Any, dtype: np.dtype, shape: list[int], count: int, where: str) -> np.ndarray:
    try:
        if dtype == DATATYPES["BYTES"]:
            flat = np.asarray(data, dtype=object).reshape(-1)
            if not all(isinstance(v, str) for v in flat):
                raise CodecError(f"{where}: BYTES data must be strings")
            array = np.array([v.encode() for v in flat] or [], dtype=object)
        else:
            array = np.asarray(data, dtype=dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError) as error:
        if isinstance(error, CodecError):
            raise
        raise CodecError(f"{where}: data is not a list of {dtype} values ({error})") from None
    if array.size != count:
        raise CodecError(f"{where}: {array.size} values for shape {shape} ({count} expected)")
    return array.reshape(shape)


def _bytes_elements(raw: memoryview, count: int, where: str) -> np.ndarray:
    """Length-prefixed elements -> object array of `bytes`."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise CodecError(f"{where}: truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + length > len(raw):
            raise CodecError(f"{where}: BYTES element {len(elements)} of {length} bytes is truncated")
        elements.append(bytes(raw[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    if len(elements) != count:
        raise CodecError(f"{where}: {len(elements)} BYTES elements for {count} expected by the shape")
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array


def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype of a numeric numpy array (BYTES outputs are not produced here)."""
    name = _NAMES.get(array.dtype.newbyteorder("<"))
    if name is None:
        raise CodecError(f"no protocol datatype for numpy dtype {array.dtype}")
    return name


def encode_infer_response(
    model_name: str, model_version: str, outputs: Sequence[tuple[str, np.ndarray]], request: InferRequest,
) -> tuple[bytes, int | None]:
    """Encode a model's outputs as the request asked.

    Args:
        outputs: (name, array) of every output the model produces, in metadata order.
        request: which outputs to return (all when it names none) and which as binary data.

    Returns:
        (body, header length): header length is None when the body is all JSON; else the JSON header is
        that many bytes and the binary outputs follow it.

    Raises:
        CodecError: the request names an output the model does not have.
    """
    produced = dict(outputs)
    wanted = ([RequestedOutput(name, request.binary_output) for name, _ in outputs] if request.outputs is None
              else request.outputs)
    entries, blobs = [], []
    for out in wanted:
        if out.name not in produced:
            raise CodecError(f"output {out.name!r} is not one of {', '.join(produced)}")
        array = np.ascontiguousarray(produced[out.name])
        entry: dict[str, Any] = {"name": out.name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if out.binary:
            blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
