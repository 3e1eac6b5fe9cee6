"""The Open Inference Protocol tensor codec: JSON and binary tensor data, both ways, and its errors.
Binary bodies are built with tritonclient's own serialisers (the client users have), not by this codec."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.http import InferInput, InferRequestedOutput, InferResult
from tritonclient.http._utils import _get_inference_request

from app.api.v2_codec import (
    CodecError,
    InferRequest,
    RequestedOutput,
    encode_infer_response,
    parse_infer_request,
)


def client_body(inputs, outputs=None, parameters=None) -> tuple[bytes, str | None]:
    """The exact body and header length tritonclient's `infer` sends."""
    body, header_length = _get_inference_request(inputs, "", outputs, 0, False, False, 0, None, parameters)
    return body, None if header_length is None else str(header_length)


def tensor(name: str, array: np.ndarray, datatype: str, binary: bool) -> InferInput:
    return InferInput(name, list(array.shape), datatype).set_data_from_numpy(array, binary_data=binary)


@pytest.mark.parametrize("binary", [False, True])
def test_numeric_and_bytes_inputs_round_trip_from_tritonclient(binary):
    images = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    loc = np.linspace(-1, 1, 24, dtype=np.float32).reshape(1, 6, 4)
    encoded = np.array([b"abc", b"de"], dtype=object)
    body, header_length = client_body(
        [tensor("images", images, "UINT8", binary), tensor("loc", loc, "FP32", binary),
         tensor("files", encoded, "BYTES", binary)],
        parameters={"score_threshold": 0.25},
    )
    assert (header_length is not None) == binary
    request = parse_infer_request(body, header_length)
    np.testing.assert_array_equal(request.inputs["images"], images)
    assert request.inputs["images"].dtype == np.uint8
    np.testing.assert_array_equal(request.inputs["loc"], loc)
    assert list(request.inputs["files"]) == [b"abc", b"de"]
    assert request.parameters["score_threshold"] == 0.25
    assert request.outputs is None and request.binary_output is True  # tritonclient's default: all binary


def test_requested_outputs_choose_binary_per_output_and_tritonclient_reads_them_back():
    boxes = np.random.default_rng(0).random((2, 3, 4), dtype=np.float32)
    labels = np.array([[0, 2, -1], [1, -1, -1]], dtype=np.int64)
    body, header_length = client_body(
        [tensor("x", np.zeros((1,), np.float32), "FP32", False)],
        outputs=[InferRequestedOutput("labels", binary_data=False), InferRequestedOutput("boxes", binary_data=True)],
    )
    request = parse_infer_request(body, header_length)
    assert request.outputs == [RequestedOutput("labels", False), RequestedOutput("boxes", True)]
    response, length = encode_infer_response("ssd", "3", [("boxes", boxes), ("labels", labels)], request)
    header = json.loads(response[:length])
    assert header["model_name"] == "ssd" and header["model_version"] == "3"
    assert [o["name"] for o in header["outputs"]] == ["labels", "boxes"]  # requested order
    assert header["outputs"][0]["data"] == labels.reshape(-1).tolist()
    assert header["outputs"][1]["parameters"] == {"binary_data_size": boxes.nbytes}
    result = InferResult.from_response_body(response, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("boxes"), boxes)
    np.testing.assert_array_equal(result.as_numpy("labels"), labels)
    assert result.as_numpy("labels").dtype == np.int64


def test_all_json_response_without_binary_outputs():
    request = InferRequest(None, {}, {}, None, binary_output=False)
    counts = np.array([2, 0], dtype=np.int32)
    response, length = encode_infer_response("ssd", "1", [("num_detections", counts)], request)
    assert length is None
    assert json.loads(response)["outputs"] == [
        {"name": "num_detections", "datatype": "INT32", "shape": [2], "data": [2, 0]}]


def test_nested_json_data_is_accepted_row_major():
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]}]})
    np.testing.assert_array_equal(parse_infer_request(body.encode(), None).inputs["x"], [[1, 2], [3, 4]])


def body_of(*inputs: dict, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


@pytest.mark.parametrize(("body", "header_length", "message"), [
    (b"{not json", None, "not valid JSON"),
    (body_of(), None, None),  # no inputs: valid for the codec, the model refuses it
    (body_of({"name": "x", "shape": [2], "datatype": "FP33", "data": [1, 2]}), None, "datatype 'FP33'"),
    (body_of({"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}), None, r"2 values for shape \[3\]"),
    (body_of({"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}), None, "input 'x': data is not"),
    (body_of({"name": "x", "shape": [1], "datatype": "FP32"}), None, "neither `data`"),
    (body_of({"name": "x", "shape": [-1], "datatype": "FP32", "data": []}), None, "negative dimension"),
    (body_of({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
             {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}), None, "given twice"),
    (body_of({"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}), None, "BYTES data must be strings"),
    (body_of({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}, outputs=[{"name": "y", "parameters":
             {"binary_data": "yes"}}]), None, "binary_data must be true or false"),
    (body_of({"nme": "x"}), None, "inputs.0.name"),
])
def test_malformed_requests_name_the_problem(body, header_length, message):
    if message is None:
        assert parse_infer_request(body, header_length).inputs == {}
        return
    with pytest.raises(CodecError, match=message):
        parse_infer_request(body, header_length)


def test_binary_data_sizes_are_checked_against_the_body():
    x = np.arange(4, dtype=np.float32)
    body, header_length = client_body([tensor("x", x, "FP32", True)])
    with pytest.raises(CodecError, match="exceeds the 12 bytes left"):
        parse_infer_request(body[:-4], header_length)
    with pytest.raises(CodecError, match="2 bytes of binary data follow"):
        parse_infer_request(body + b"\0\0", header_length)
    with pytest.raises(CodecError, match="Inference-Header-Content-Length"):
        parse_infer_request(body, "999999")
    wrong_shape = json.loads(body[: int(header_length)])
    wrong_shape["inputs"][0]["shape"] = [3]
    header = json.dumps(wrong_shape).encode()
    with pytest.raises(CodecError, match="16 bytes for shape \\[3\\] of FP32 \\(12 expected\\)"):
        parse_infer_request(header + x.tobytes(), str(len(header)))


def test_truncated_bytes_elements_are_refused():
    files = np.array([b"abcdef"], dtype=object)
    body, header_length = client_body([tensor("files", files, "BYTES", True)])
    header = json.loads(body[: int(header_length)])
    header["inputs"][0]["parameters"]["binary_data_size"] = 8  # length prefix 6, only 4 bytes follow
    raw = json.dumps(header).encode()
    with pytest.raises(CodecError, match="BYTES element 0 of 6 bytes is truncated"):
        parse_infer_request(raw + body[int(header_length):][:8], str(len(raw)))


def test_unknown_requested_output_is_refused():
    request = InferRequest(None, {}, {}, [RequestedOutput("nope", False)], False)
    with pytest.raises(CodecError, match="output 'nope' is not one of boxes"):
        encode_infer_response("ssd", "1", [("boxes", np.zeros((1, 0, 4), np.float32))], request)
