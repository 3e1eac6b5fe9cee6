"""Hostile input: fuzzed bodies, decompression bombs, truncated images, a lying Content-Length, deep
nesting, huge numbers, lying safetensors headers, and missing or wrong tokens.

Each is answered with a 4xx in bounded time and memory, and leaves the model version, the queue and
the checkpoints as they were. Everything runs in-process (TestClient) except the Content-Length claim,
which needs a real socket and a real server that must not wait for gigabytes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import time
import zlib
from collections.abc import Iterator

import httpx
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ssd_core.data.images import encode_jpeg, encode_png
from ssd_core.data.synthetic import ShapesDataset
from tests.app.conftest import TOKEN, ServiceClient, labelled, make_settings, png_bytes, start_client
from tests.integration.live import LiveService, run_service
from tests.reliability.conftest import checkpoint_digests, file_stamps, rss_mib, scrape

SHAPES = ShapesDataset(4, image_size=64, seed=3)
DEEP = 100_000  # nesting levels: far past Python's recursion limit and pydantic's
HUGE_NUMBERS = ["1e400", "-1e400", "1" + "0" * 1000, "-" + "9" * 5000]
MAX_SECONDS = 5.0  # each hostile request is answered well within this, even on a loaded 2-core machine
MAX_GROWTH_MIB = 200  # what the process may grow by while refusing a bomb (a decoded one is gigabytes)
STALL_S = 1.0  # SSD_BODY_STALL_TIMEOUT_S of the live server


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[ServiceClient]:
    """One in-process service for the module (hypothesis cannot use function-scoped fixtures)."""
    with start_client(make_settings(tmp_path_factory.mktemp("hostile"))) as c:
        yield c


class Unchanged:
    """The observable state a refused request must not touch."""

    def __init__(self, client: ServiceClient) -> None:
        self.client = client
        self.version = client.version
        self.queue = client.sample("ssd_finetune_queue_depth")
        self.jobs = sum(client.sample("ssd_finetune_jobs_total", state=s) for s in ("succeeded", "failed", "cancelled"))
        self.steps = client.sample("ssd_finetune_steps_total")
        self.checkpoints = file_stamps(client.app.state.settings.checkpoint_dir)

    def check(self) -> None:
        c = self.client
        assert c.version == self.version
        assert c.sample("ssd_finetune_queue_depth") == self.queue
        assert c.sample("ssd_finetune_steps_total") == self.steps
        assert sum(c.sample("ssd_finetune_jobs_total", state=s) for s in ("succeeded", "failed", "cancelled")) == self.jobs
        assert file_stamps(c.app.state.settings.checkpoint_dir) == self.checkpoints
        assert c.get("/readyz").status_code == 200


def refused(response, statuses: tuple[int, ...] = (400, 413, 415, 422)) -> dict:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["message"]
    return error


# ---- fuzzing: generated malformed bodies, no 5xx, nothing changed

FIELD_NAMES = ["images", "image", "boxes", "labels", "difficult", "steps", "learning_rate", "augment", "predictions",
               "loc", "conf", "targets", "box", "label", "priors", "options", "score_threshold", "max_detections",
               "version", "match_type", "neg_pos", "variance", "bkg_label"]
SCALARS = (
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6),
                                                                inner, max_size=5),
    max_leaves=25,
)
JSON_BODIES = st.one_of(
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),  # NaN/Infinity come out as invalid JSON tokens
    st.binary(max_size=200),
)
JSON_ENDPOINTS = [("POST", "/score-loss"), ("POST", "/detect"), ("POST", "/finetune"), ("POST", "/finetune?wait=true"),
                  ("POST", "/model/rollback"), ("POST", "/model/checkpoint"), ("DELETE", "/finetune/x"),
                  ("GET", "/finetune/x")]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _no_5xx_and_unchanged_unless_accepted(client: ServiceClient, response, before: Unchanged) -> None:
    assert response.status_code < 500, response.text[:300]
    if response.status_code >= 400:
        before.check()


@FUZZ
@given(endpoint=st.sampled_from(JSON_ENDPOINTS), body=JSON_BODIES,
       content_type=st.sampled_from(["application/json", "application/octet-stream", "text/plain"]))
def test_fuzzed_json_bodies(client, endpoint, body, content_type):
    before = Unchanged(client)
    method, path = endpoint
    response = client.request(method, path, content=body, headers={"Content-Type": content_type})
    _no_5xx_and_unchanged_unless_accepted(client, response, before)


IMAGE_BYTES = st.one_of(
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=len(png_bytes(SHAPES))).map(lambda n: png_bytes(SHAPES)[:n]),
    st.just(png_bytes(SHAPES)),
)


@FUZZ
@given(
    path=st.sampled_from(["/detect", "/finetune"]),
    images=st.lists(IMAGE_BYTES, max_size=3),
    annotations=st.one_of(JSON_VALUES.map(json.dumps), st.text(max_size=40)),
    fields=st.dictionaries(st.sampled_from(["steps", "learning_rate", "augment", "score_threshold",
                                            "max_detections", "images"]), st.text(max_size=8), max_size=3),
)
def test_fuzzed_multipart_bodies(client, path, images, annotations, fields):
    before = Unchanged(client)
    files = [("images", (f"{k}.png", data, "image/png")) for k, data in enumerate(images)]
    response = client.post(path, files=files or None, data={"annotations": annotations, **fields})
    _no_5xx_and_unchanged_unless_accepted(client, response, before)
    if path == "/finetune":
        assert response.status_code >= 400  # no generated body is a valid job (images and boxes never agree)


# ---- decompression bombs and truncated images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~100-byte valid-looking PNG declaring width x height RGB pixels (30 GB decoded)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 1024, 9)  # a few rows' worth: a decoder would allocate before finding out
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def jpeg_bomb(width: int = 65_000, height: int = 65_000) -> bytes:
    """A real JPEG whose frame header is patched to declare width x height."""
    data = bytearray(encode_jpeg(SHAPES[0].image))
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _image_requests(data: bytes) -> list[tuple[str, dict]]:
    """The same image through every endpoint that decodes images, JSON and multipart."""
    encoded = base64.b64encode(data).decode()
    note = {"boxes": [[1, 1, 20, 20]], "labels": [0]}
    return [
        ("/detect", {"json": {"images": [{"image": encoded}]}}),
        ("/score-loss", {"json": {"images": [{"image": encoded, **note}]}}),
        ("/finetune", {"json": {"images": [{"image": encoded, **note}] * 2}}),
        ("/detect", {"files": [("images", ("x", data, "image/png"))]}),
        ("/finetune", {"files": [("images", ("x", data, "image/png"))] * 2, "data": {"annotations": json.dumps([note] * 2)}}),
    ]


@pytest.mark.parametrize("image", [png_bomb(), png_bomb(70_000, 3), jpeg_bomb()], ids=["png", "png-wide", "jpeg"])
def test_decompression_bombs_are_refused_from_the_header(client, image):
    before = Unchanged(client)
    rss = rss_mib_self()
    for path, kwargs in _image_requests(image):
        start = time.monotonic()
        error = refused(client.post(path, **kwargs), (422,))
        assert time.monotonic() - start < MAX_SECONDS
        assert error["code"] == "invalid_image" and "exceeds the limit" in error["message"], error
    assert rss_mib_self() - rss < MAX_GROWTH_MIB
    before.check()


def rss_mib_self() -> float:
    return rss_mib(os.getpid())


def test_truncated_images_are_refused(client):
    jpeg, png = encode_jpeg(SHAPES[0].image), png_bytes(SHAPES)
    cuts = [jpeg[:n] for n in (2, 20, len(jpeg) // 3, len(jpeg) // 2, len(jpeg) - 2)]
    cuts += [png[:n] for n in (8, 30, len(png) // 2)]
    before = Unchanged(client)
    for data in cuts:
        for path, kwargs in _image_requests(data):
            error = refused(client.post(path, **kwargs), (422,))
            assert error["code"] == "invalid_image", error
    before.check()


# ---- deep nesting and huge numbers


def test_deeply_nested_json_everywhere(client):
    """Nesting past Python's recursion limit in a JSON body, a multipart JSON field, a safetensors header
    and a safetensors metadata value: 400/422, never a RecursionError turned 500."""
    before = Unchanged(client)
    deep = "[" * DEEP + "]" * DEEP
    for path in ("/score-loss", "/detect", "/finetune", "/model/rollback"):
        refused(client.post(path, content=deep, headers={"Content-Type": "application/json"}), (400, 422))
        refused(client.post(path, content='{"images": ' + deep + "}", headers={"Content-Type": "application/json"}),
                (400, 422))
    files = [("images", (f"{k}.png", png_bytes(SHAPES, k), "image/png")) for k in range(2)]
    error = refused(client.post("/finetune", files=files, data={"annotations": deep}), (400,))
    assert error["field"] == "annotations"
    error = refused(client.post("/score-loss", content=safetensors_body(deep.encode()), headers=BINARY), (400,))
    assert error["field"] == "body"
    header = {"__metadata__": {"neg_pos": deep}, **_tensor_entries({"loc": [1, 1, 4]})}
    refused(client.post("/score-loss", content=safetensors_body(json.dumps(header).encode(), b"\0" * 16),
                        headers=BINARY), (400, 422))
    before.check()


@pytest.mark.parametrize("number", HUGE_NUMBERS, ids=["1e400", "-1e400", "10^1000", "-10^5000"])
def test_huge_numbers_in_every_numeric_field(client, number):
    item = labelled(SHAPES, (0,))[0]
    image = json.dumps(item["image"])
    bodies = {
        "/score-loss": [
            f'{{"predictions": {{"loc": [[[{number}, 0, 0, 0]]], "conf": [[[0, 0, 0, 0]]]}}, '
            '"targets": [[{"box": [0, 0, 1, 1], "label": 0}]]}',
            '{"predictions": {"loc": [[[0, 0, 0, 0]]], "conf": [[[0, 0, 0, 0]]]}, '
            f'"targets": [[{{"box": [0, 0, 1, 1], "label": {number}}}]]}}',
            f'{{"images": [{{"image": {image}, "boxes": [[0, 0, {number}, 5]], "labels": [0]}}]}}',
            '{"predictions": {"loc": [[[0, 0, 0, 0]]], "conf": [[[0, 0, 0, 0]]]}, '
            f'"targets": [[{{"box": [0, 0, 1, 1], "label": 0}}]], "options": {{"neg_pos": {number}}}}}',
        ],
        "/detect": [f'{{"images": [{{"image": {image}}}], "max_detections": {number}}}',
                    f'{{"images": [{{"image": {image}}}], "score_threshold": {number}}}'],
        "/finetune": [f'{{"images": [{json.dumps(item)}, {json.dumps(item)}], "steps": {number}}}',
                      f'{{"images": [{json.dumps(item)}, {json.dumps(item)}], "learning_rate": {number}}}',
                      f'{{"images": [{{"image": {image}, "boxes": [[0, 0, 5, 5]], "labels": [{number}]}}]}}'],
        "/model/rollback": [f'{{"version": {number}}}'],
    }
    before = Unchanged(client)
    for path, texts in bodies.items():
        for text in texts:
            start = time.monotonic()
            refused(client.post(path, content=text, headers={"Content-Type": "application/json"}),
                    (400, 404, 422))
            assert time.monotonic() - start < MAX_SECONDS
    files = [("images", ("0.png", png_bytes(SHAPES), "image/png"))]
    refused(client.post("/detect", files=files, data={"max_detections": number}), (422,))
    refused(client.post("/finetune", files=files * 2, data={"steps": number, "annotations": "[]"}), (400, 422))
    before.check()


# ---- safetensors headers that lie

BINARY = {"Content-Type": "application/octet-stream"}


def safetensors_body(header: bytes, data: bytes = b"", declared_length: int | None = None) -> bytes:
    length = len(header) if declared_length is None else declared_length
    return struct.pack("<Q", length) + header + data


def _tensor_entries(shapes: dict[str, list[int]], offsets: dict[str, list[int]] | None = None) -> dict:
    entries, start = {}, 0
    for name, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        entries[name] = {"dtype": "F32", "shape": shape,
                         "data_offsets": (offsets or {}).get(name, [start, start + size])}
        start += size
    return entries


LYING_HEADERS = {
    "length prefix of 1 TB": safetensors_body(b"{}", declared_length=2**40),
    "length prefix of 2^64-1": safetensors_body(b"{}", declared_length=2**64 - 1),
    "offsets past the data": safetensors_body(json.dumps(_tensor_entries(
        {"loc": [1, 2, 4], "conf": [1, 2, 4], "targets": [1, 1, 6]},
        {"loc": [0, 32], "conf": [32, 64], "targets": [64, 10**12]})).encode(), b"\0" * 88),
    "shape larger than its bytes": safetensors_body(json.dumps(_tensor_entries(
        {"loc": [1, 2, 4], "conf": [1, 2, 4], "targets": [1, 1, 6]},
        {"loc": [0, 32], "conf": [32, 64], "targets": [64, 68]})).encode(), b"\0" * 68),
    "overlapping offsets": safetensors_body(json.dumps(_tensor_entries(
        {"loc": [1, 2, 4], "conf": [1, 2, 4], "targets": [1, 1, 6]},
        {"loc": [0, 32], "conf": [0, 32], "targets": [8, 32]})).encode(), b"\0" * 32),
    "reversed offsets": safetensors_body(json.dumps(_tensor_entries(
        {"loc": [1, 2, 4], "conf": [1, 2, 4], "targets": [1, 1, 6]},
        {"loc": [32, 0], "conf": [32, 64], "targets": [64, 88]})).encode(), b"\0" * 88),
    "shape product overflows": safetensors_body(json.dumps(_tensor_entries(
        {"loc": [2**62, 2**62, 4], "conf": [1, 1, 4], "targets": [1, 1, 6]},
        {"loc": [0, 16], "conf": [16, 32], "targets": [32, 56]})).encode(), b"\0" * 56),
    "terabyte tensor in a tiny body": safetensors_body(json.dumps(_tensor_entries(
        {"loc": [1, 2**36, 4], "conf": [1, 1, 4], "targets": [1, 1, 6]})).encode(), b"\0" * 64),
    "negative dimension": safetensors_body(json.dumps(_tensor_entries(
        {"loc": [1, -2, 4], "conf": [1, 1, 4], "targets": [1, 1, 6]},
        {"loc": [0, 16], "conf": [16, 32], "targets": [32, 56]})).encode(), b"\0" * 56),
    "header not an object": safetensors_body(b"[1, 2, 3]"),
    "0-dim priors": safetensors.torch.save({"loc": torch.zeros(1, 2, 4), "conf": torch.zeros(1, 2, 4),
                                            "targets": torch.zeros(1, 0, 5), "priors": torch.tensor(0.5)}),
    "1-dim loc": safetensors.torch.save({"loc": torch.zeros(8), "conf": torch.zeros(1, 2, 4),
                                         "targets": torch.zeros(1, 0, 5)}),
    "header not UTF-8": safetensors_body(b"\xff\xfe{}"),
}


@pytest.mark.parametrize("body", LYING_HEADERS.values(), ids=LYING_HEADERS.keys())
def test_lying_safetensors_headers(client, body):
    before = Unchanged(client)
    rss = rss_mib_self()
    start = time.monotonic()
    refused(client.post("/score-loss", content=body, headers=BINARY), (400, 422))
    assert time.monotonic() - start < MAX_SECONDS
    assert rss_mib_self() - rss < MAX_GROWTH_MIB
    before.check()


# ---- tokens


@pytest.fixture
def secured(tmp_path) -> Iterator[ServiceClient]:
    with start_client(make_settings(tmp_path, api_token=TOKEN, finetune_queue_size=4, finetune_max_steps=5000)) as c:
        yield c


BAD_AUTH = [{}, {"Authorization": "Bearer "}, {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
            {"Authorization": f"Basic {base64.b64encode(TOKEN.encode()).decode()}"}, {"Authorization": TOKEN},
            {"Authorization": f"Bearer {TOKEN} {TOKEN}"}, {"X-Api-Token": TOKEN}]


def test_every_mutating_endpoint_refuses_a_missing_or_wrong_token(secured):
    """401 for each, with a job running and one queued; neither job, the version nor the checkpoint
    files change (the trainer is held on the running job by its 5000 steps)."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    items = labelled(SHAPES)
    running = secured.post("/finetune", json={"images": items, "steps": 5000, "learning_rate": 1e-4}, headers=auth)
    queued = secured.post("/finetune", json={"images": items, "steps": 1}, headers=auth)
    assert running.status_code == queued.status_code == 202
    running_id, queued_id = running.json()["job_id"], queued.json()["job_id"]
    checkpoints = checkpoint_digests(secured.app.state.settings.checkpoint_dir)
    files = [("images", (f"{k}.png", png_bytes(SHAPES, k), "image/png")) for k in range(2)]
    notes = json.dumps([{"boxes": SHAPES[k].boxes.tolist(), "labels": SHAPES[k].labels.tolist()} for k in range(2)])
    try:
        for headers in BAD_AUTH:
            for method, path, kwargs in [
                ("POST", "/finetune", {"json": {"images": items}}),
                ("POST", "/finetune?wait=true", {"json": {"images": items}}),
                ("POST", "/finetune", {"files": files, "data": {"annotations": notes}}),
                ("DELETE", f"/finetune/{running_id}", {}),
                ("DELETE", f"/finetune/{queued_id}", {}),
                ("POST", "/model/checkpoint", {}),
                ("POST", "/model/rollback", {"json": {"version": 0}}),
                ("POST", "/model/versions/0/pin", {}),
                ("DELETE", "/model/versions/0/pin", {}),
                ("POST", "/validation", {"json": {"images": items}}),
                ("POST", "/validation", {"files": files, "data": {"annotations": notes}}),
                ("DELETE", "/validation", {}),
            ]:
                response = secured.request(method, path, headers=headers, **kwargs)
                assert response.status_code == 401, (headers, path, response.text)
                assert response.json()["error"]["field"] == "Authorization"
            assert secured.get(f"/finetune/{queued_id}").json()["status"] == "queued"
            assert secured.get(f"/finetune/{running_id}").json()["cancel_requested"] is False
        assert secured.sample("ssd_finetune_queue_depth") == 1
        assert secured.get("/model").json()["restored_from"] is None
        assert checkpoint_digests(secured.app.state.settings.checkpoint_dir) == checkpoints
    finally:
        for job_id in (queued_id, running_id):
            secured.delete(f"/finetune/{job_id}", headers=auth)
    cancelled = secured.get(f"/finetune/{running_id}").json()
    deadline = time.monotonic() + 60
    while cancelled["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        cancelled = secured.get(f"/finetune/{running_id}").json()
    assert cancelled["status"] == "cancelled" and cancelled["steps_done"] < 5000
    # versions are those of the steps it completed, no more (no 401 request published anything)
    assert secured.version == cancelled["model_version"] == cancelled["steps_done"] - cancelled["skipped_steps"]


# ---- a Content-Length claim of gigabytes against the real server


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveService]:
    with run_service(tmp_path_factory.mktemp("hostile-live"), module=True, SSD_MAX_BODY_BYTES=str(2**20),
                     SSD_BODY_STALL_TIMEOUT_S=str(STALL_S)) as service:
        yield service


@pytest.mark.xdist_group("reliability-live")
@pytest.mark.parametrize("path", ["/score-loss", "/detect", "/finetune"])
def test_gigabyte_content_length_is_refused_without_reading(live, path):
    """The header claims 5 GB, a few bytes follow, the socket stays open: the 413 comes at once, not
    after a timeout, and the server does not grow."""
    host, port = live.host_port.split(":")
    rss = rss_mib(live.process.pid)
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=MAX_SECONDS) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {5 * 2**30}\r\n\r\n".encode() + b'{"images": [')
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    elapsed = time.monotonic() - start
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.split()[1] == b"413", reply[:300]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_too_large"
    assert elapsed < MAX_SECONDS
    assert rss_mib(live.process.pid) - rss < 50
    assert scrape(live.url).value("ssd_http_requests_total", route=path, status="413") >= 1
    assert live.process.poll() is None


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X9"]
HEADER_ENTRIES = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "shape": st.lists(st.integers(min_value=-2, max_value=2**40), max_size=4)
    | st.lists(st.integers(min_value=0, max_value=8), min_size=3, max_size=3),
    "data_offsets": st.lists(st.integers(min_value=-1, max_value=2**33), min_size=0, max_size=3),
})
SAFETENSORS_HEADERS = st.dictionaries(
    st.sampled_from(["loc", "conf", "targets", "priors", "__metadata__", "other"]),
    HEADER_ENTRIES | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3) | SCALARS,
    max_size=5,
)


@FUZZ
@given(header=SAFETENSORS_HEADERS, data=st.binary(max_size=512),
       length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40]))
def test_fuzzed_safetensors_headers(client, header, data, length_delta):
    """Structured but wrong headers (dtypes, shapes, offsets, metadata) over random data: never a 5xx
    (the safetensors parser's own errors, including a Rust panic, are a 400)."""
    before = Unchanged(client)
    encoded = json.dumps(header).encode()
    body = safetensors_body(encoded, data, declared_length=max(0, len(encoded) + length_delta))
    response = client.post("/score-loss", content=body, headers=BINARY)
    _no_5xx_and_unchanged_unless_accepted(client, response, before)


# ---- structured fuzzing: well-formed JSON with wrong shapes and extreme values reaches the loss

NUM_PRIORS = 7  # the bodies carry their own priors, so the predictions stay small
EXTREMES = st.sampled_from([0.0, 1.0, -1.0, 0.5, 0.25, 0.75, 1.5, -0.5, 10.0, 1e4, 1e30, -1e30, 3e38, 1e-45])


def rectangular(shape: list[int]) -> st.SearchStrategy:
    """Nested lists of `shape` holding float extremes."""
    if not shape:
        return EXTREMES
    return st.lists(rectangular(shape[1:]), min_size=shape[0], max_size=shape[0])


UNIT = st.floats(min_value=0.05, max_value=0.45)
VALID_BOX = st.tuples(UNIT, UNIT, UNIT, UNIT).map(lambda v: [v[0], v[1], v[0] + v[2], v[1] + v[3]])
VALID_PRIOR = st.tuples(UNIT, UNIT, UNIT, UNIT).map(lambda v: [v[0] + 0.1, v[1] + 0.1, v[2], v[3]])
LOSS_OPTIONS = st.fixed_dictionaries({}, optional={
    "overlap_thresh": st.sampled_from([0.5, 1.0, 1e-9]), "neg_pos": st.sampled_from([0, 3, 10**6, 2**31]),
    "neg_overlap": st.sampled_from([0, 0.5, 1]), "bkg_label": st.integers(0, 4), "neg_mining": st.booleans(),
    "prior_for_matching": st.booleans(), "encode_target": st.booleans(),
    "variance": st.sampled_from([[0.1, 0.2], [1e-30, 1e-30], [1e30, 1e30]]), "loc_weight": st.sampled_from([0, 1, 1e30]),
    "match_type": st.sampled_from(["per_prediction", "bipartite"])})
# at most one structural flaw per body, so half of them are well-formed and reach the loss
FLAWS = ["none"] * 6 + ["empty batch", "ragged loc", "P mismatch", "C mismatch", "B mismatch", "label", "box", "priors"]


@st.composite
def score_loss_bodies(draw) -> dict:
    flaw = draw(st.sampled_from(FLAWS))
    batch = 0 if flaw == "empty batch" else draw(st.sampled_from([1, 2]))
    p = NUM_PRIORS
    loc = draw(rectangular([batch, p, 4]))
    conf = draw(rectangular([batch + (flaw == "B mismatch"), p - (flaw == "P mismatch"), 4 - (flaw == "C mismatch")]))
    if flaw == "ragged loc":
        loc[-1].pop()
    targets = [draw(st.lists(st.fixed_dictionaries({"box": VALID_BOX, "label": st.integers(0, 2)},
                                                   optional={"difficult": st.booleans()}), max_size=3))
               for _ in range(batch)]
    if flaw in ("label", "box") and batch:
        bad = draw(st.integers(-2, 5).filter(lambda v: not 0 <= v <= 2)) if flaw == "label" else draw(
            st.lists(EXTREMES, min_size=4, max_size=4))
        targets[0].append({"box": bad, "label": 0} if flaw == "box" else {"box": [0.1, 0.1, 0.5, 0.5], "label": bad})
    priors = draw(rectangular([p, 4]) if flaw == "priors" else st.lists(VALID_PRIOR, min_size=p, max_size=p))
    return {"predictions": {"loc": loc, "conf": conf}, "targets": targets, "priors": priors,
            "options": draw(LOSS_OPTIONS)}


@FUZZ
@given(body=score_loss_bodies())
def test_fuzzed_score_loss_predictions(client, body):
    """Ragged or mismatched shapes, labels out of range, boxes and priors at float extremes, every loss
    option at its edges: a 200 with finite numbers or a 4xx, never a 5xx."""
    before = Unchanged(client)
    response = client.post("/score-loss", json=body)
    _no_5xx_and_unchanged_unless_accepted(client, response, before)
    if response.status_code == 200:
        result = response.json()
        assert all(abs(result[key]) < float("inf") for key in ("loss", "loss_l", "loss_c"))


# ---- uploads that stall: dropped after SSD_BODY_STALL_TIMEOUT_S, counted, the others served meanwhile

STALLED_CLIENTS = 12


@pytest.mark.xdist_group("reliability-live")
def test_stalled_bodies_are_dropped_and_counted(live):
    """Clients send their headers and part of the body, then nothing: each gets 408 `body_stalled` and a
    closed connection within a few bounds, while another client keeps being served."""
    host, port = live.host_port.split(":")
    before = scrape(live.url).value("ssd_http_stalled_bodies_total")
    sockets = []
    for path in ["/score-loss", "/detect", "/finetune"] * (STALLED_CLIENTS // 3):
        sock = socket.create_connection((host, int(port)), timeout=10 * STALL_S)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n".encode() + b'{"images": [')
        sockets.append(sock)
    start = time.monotonic()
    try:
        assert httpx.get(f"{live.url}/model", timeout=5).status_code == 200  # served meanwhile
        for sock in sockets:
            reply = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                reply += chunk
            status_line, _, rest = reply.partition(b"\r\n")
            assert status_line.split()[1] == b"408", reply[:300]
            assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_stalled"
    finally:
        for sock in sockets:
            sock.close()
    assert time.monotonic() - start < 5 * STALL_S
    assert scrape(live.url).value("ssd_http_stalled_bodies_total") - before == STALLED_CLIENTS
    assert scrape(live.url).value("ssd_http_requests_total", route="/detect", status="408") >= STALLED_CLIENTS // 3


# ---- 256 ways to reach a mutating endpoint without the token, against the real server


@pytest.fixture(scope="module")
def secured_live(tmp_path_factory) -> Iterator[LiveService]:
    with run_service(tmp_path_factory.mktemp("secured-live"), module=True, SSD_API_TOKEN=TOKEN) as service:
        yield service


def _tokenless_forms(host_port: str, body: bytes) -> list[tuple[str, str, dict[str, str]]]:
    """(method, request target, headers) for every endpoint: paths bent (trailing slash, case, percent
    encoding, dot segments, `//`, absolute-form targets), other methods, override headers, near-miss tokens."""
    endpoints = [("POST", "/finetune"), ("DELETE", "/finetune/0123"), ("POST", "/model/checkpoint"),
                 ("POST", "/model/rollback"), ("POST", "/model/versions/0/pin"), ("DELETE", "/model/versions/0/pin"),
                 ("POST", "/validation"), ("DELETE", "/validation")]
    near_misses = [f"Bearer {TOKEN.upper()}", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[1:]}",
                   f"Basic {base64.b64encode(TOKEN.encode()).decode()}", f"Token {TOKEN}", TOKEN, "Bearer ",
                   f"Bearer\t{TOKEN}", f"Bearer {TOKEN} {TOKEN}"]
    forms = []
    for method, path in endpoints:
        head, _, last = path.rpartition("/")
        for target in [path, path + "/", path.upper(), path.title(), f"{head}/%{ord(last[0]):02X}{last[1:]}",
                       f"{head}%2F{last}", f"{head}/./{last}", f"/x/..{path}", f"/{path}", f"{path};x",
                       f"{path}?token={TOKEN}", f"http://{host_port}{path}", f"http://localhost{path}"]:
            forms.append((method, target, {}))
        forms += [(other, path, {}) for other in ("HEAD", "OPTIONS", "PUT", "PATCH")]
        forms += [("GET", path, {name: method}) for name in ("X-HTTP-Method-Override", "X-HTTP-Method")]
        forms += [("GET", "/model", {"X-Original-URL": path}), (method, path, {"X-Forwarded-For": "127.0.0.1"})]
        forms += [(method, path, {"Authorization": value}) for value in near_misses]
        forms += [(method, path, {"X-Api-Token": TOKEN})]
    return forms


def _raw_request(host_port: str, method: str, target: str, headers: dict[str, str], body: bytes) -> int:
    host, port = host_port.split(":")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host_port}", "Connection: close",
             "Content-Type: application/json", f"Content-Length: {len(body)}",
             *(f"{name}: {value}" for name, value in headers.items())]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


@pytest.mark.xdist_group("reliability-live")
def test_256_tokenless_attempts_all_fail(secured_live):
    """None of them changes anything: not the version, the pins, the jobs, the validation set nor a file.
    (A doubled space after `Bearer` is not a near miss: FastAPI strips it, and it is the right token.)"""
    service = secured_live
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(f"{service.url}/model/versions/0/pin", headers=auth).status_code == 200  # unpin would work
    body = json.dumps({"images": labelled(SHAPES), "version": 0}).encode()
    checkpoint_dir = service.log.parent / "checkpoints"
    files = checkpoint_digests(checkpoint_dir)
    model = httpx.get(f"{service.url}/model").json()
    forms = _tokenless_forms(service.host_port, body)
    assert len(forms) == 256
    answered = [(method, target, headers, _raw_request(service.host_port, method, target, headers, body))
                for method, target, headers in forms]
    # refused (4xx), redirected (307 to the path without its slash: a token-less request again), or a read
    # (GET /validation, GET /model under an override header) that the state checks below show changed nothing
    passed = [a for a in answered if not (300 <= a[3] < 500 or (a[0] == "GET" and a[3] == 200))]
    assert passed == [], "a token-less attempt was not refused"
    assert sum(400 <= a[3] < 500 for a in answered) >= 200
    metrics = scrape(service.url)
    assert httpx.get(f"{service.url}/model").json() == model
    assert httpx.get(f"{service.url}/model/versions").json()["versions"][0]["pinned"] is True
    assert metrics.value("ssd_finetune_queue_depth") == 0 and metrics.value("ssd_validation_images") == 0
    assert sum(metrics.value("ssd_finetune_jobs_total", state=s) for s in ("succeeded", "failed", "cancelled")) == 0
    assert checkpoint_digests(checkpoint_dir) == files


# ---- 16-bit and EXIF-oriented images: decoded as displayed on every path (files made here)


def _png_16_bit(image: torch.Tensor) -> bytes:
    """The 8-bit RGB `image` [3, H, W] as a real 16-bit PNG (each sample v * 257, the same intensity)."""
    samples = image.permute(1, 2, 0).to(torch.int32) * 257  # [H, W, 3]
    height, width = samples.shape[:2]
    rows = b"".join(b"\0" + samples[y].numpy().astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(
        b"IEND", b"")


def _stored_turned(image: torch.Tensor) -> bytes:
    """A PNG whose pixels are `image` turned a quarter counter-clockwise, with EXIF orientation 6 (turn
    clockwise to display), as a phone writes a portrait photo: it displays as `image`."""
    stored = Image.fromarray(image.rot90(1, dims=(1, 2)).permute(1, 2, 0).contiguous().numpy())
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif)
    return buffer.getvalue()


def _decoding_answers(client: ServiceClient, data: bytes, box: list[float]) -> list:
    """What every image-decoding path answers for `data` with one box in the displayed frame."""
    encoded = base64.b64encode(data).decode()
    note = {"boxes": [box], "labels": [0]}
    detect = client.post("/detect", json={"images": [{"image": encoded}], "score_threshold": 0.01})
    multipart = client.post("/detect", files=[("images", ("x", data, "image/png"))], data={"score_threshold": "0.01"})
    loss = client.post("/score-loss", json={"images": [{"image": encoded, **note}] * 2})
    v2 = client.post("/v2/models/ssd/infer", json={"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                                                 "data": [encoded]}]})
    answers = [detect.json()["detections"], multipart.json()["detections"], loss.json()["loss"],
               v2.json()["outputs"]]
    for response in (detect, multipart, loss, v2):
        assert response.status_code == 200, response.text
    return answers


def test_16_bit_and_exif_oriented_images_answer_as_their_displayed_8_bit_twin(client):
    """A tall 48x96 image: as 8-bit PNG, as 16-bit PNG, and stored wide (96x48) with EXIF orientation 6.
    Every path answers the same for all three, and a box that fits only the displayed (tall) frame is
    accepted by the labelled paths, fine-tuning and validation included."""
    image = torch.zeros(3, 96, 48, dtype=torch.uint8)
    image[0, 60:90, 5:40] = 255  # a red block low in the tall frame: outside a 96x48 (wide) one
    image[1, 10:30, 10:20] = 200
    box = [5.0, 60.0, 40.0, 90.0]  # y > 48: entirely outside the stored frame
    displayed = _decoding_answers(client, encode_png(image), box)
    assert _decoding_answers(client, _png_16_bit(image), box) == displayed
    assert _decoding_answers(client, _stored_turned(image), box) == displayed
    before = Unchanged(client)
    for data in (_png_16_bit(image), _stored_turned(image)):
        encoded = base64.b64encode(data).decode()
        labelled_images = [{"image": encoded, "boxes": [box], "labels": [0]}] * 2
        assert client.post("/validation", json={"images": labelled_images}).status_code == 200
        job = client.post("/finetune?wait=true", json={"images": labelled_images, "steps": 1}).json()
        assert job["status"] == "succeeded", job
    assert client.version == before.version + 2
