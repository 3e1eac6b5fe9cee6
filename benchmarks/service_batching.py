"""The dynamic batching table of `bench_service.py --part batching` (issue 12).

`/detect` (JSON, one 256x256 PNG per request) and the Open Inference Protocol (`tritonclient`, the same PNG
as BYTES, binary) with N concurrent clients, batching on (`SSD_MAX_BATCH_DELAY_MS=5`) and off (`0`), against
the in-process bare forward + post-processing of ssd-small (`model_inputs`, the model, `detect`) at batch
sizes N and 32 (the batch limit), all in one run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import torch
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from ssd_core.data.images import encode_png, model_inputs
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.models import build_model
from ssd_core.models.postprocess import detect

CLIENTS = (1, 4, 8, 16)
LIMIT = 32  # SSD_MAX_BATCH_IMAGES's default
DELAY_MS = 5


def _png() -> bytes:
    return encode_png(ShapesDataset(1, image_size=256, seed=1)[0].image)


def _triton_sender(host_port: str, png: bytes) -> Callable:
    files = np.array([png], dtype=object)

    @contextlib.contextmanager
    def sender() -> Iterator[Callable[[], None]]:
        with triton.InferenceServerClient(host_port, network_timeout=600) as client:
            tensor = triton.InferInput("images", [1], "BYTES").set_data_from_numpy(files, binary_data=True)

            def send() -> None:
                client.infer("ssd", [tensor])  # all outputs, binary

            yield send

    return sender


def bare_rate(model, image: torch.Tensor, batch: int, seconds: float) -> dict[str, float]:
    """In-process images/s and per-batch latency of forward + post-processing of `batch` decoded images."""
    images = [image] * batch
    times = []
    stop_at = time.monotonic() + seconds
    with torch.inference_mode():
        while time.monotonic() < stop_at or len(times) < 3:
            start = time.perf_counter()
            loc, conf, priors = model(model_inputs(images, model.spec))
            detect(loc, conf, priors, score_threshold=0.3, max_detections=100, image_sizes=[(256, 256)] * batch)
            times.append(time.perf_counter() - start)
    ordered = sorted(times[1:])  # the first call warms up
    return {"ips": batch * len(ordered) / sum(ordered), "p50_ms": 1000 * ordered[len(ordered) // 2],
            "min_ms": 1000 * ordered[0]}


def forwards(url: str) -> tuple[float, float]:
    """(images, forward passes) the server has run so far, from its batch size histogram (all routes)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for suffix in totals:
                if sample.name == f"ssd_inference_batch_size_{suffix}":
                    totals[suffix] += sample.value
    return totals["sum"], totals["count"]


def run(live_server, drive, run_clients, threads: int, seconds: float) -> None:
    """Measure and print the table. Both servers (ssd-small, torch threads `threads`) run side by side and
    the rows interleave (on, off, bare for each N), so that load drift on the shared machine hits all alike."""
    load_before = os.getloadavg()
    png = _png()
    body = json.dumps({"images": [{"image": base64.b64encode(png).decode()}]}).encode()
    rows: dict[tuple[str, str, int], dict[str, float]] = {}
    bare: dict[int, dict[str, float]] = {}
    torch.set_num_threads(threads)
    model = build_model("ssd-small", 4).eval()
    image = ShapesDataset(1, image_size=256, seed=1)[0].image
    limits = {"SSD_MAX_BATCH_IMAGES": str(LIMIT)}
    with live_server("ssd-small", 4, threads, SSD_MAX_BATCH_DELAY_MS=str(DELAY_MS), **limits) as on, \
            live_server("ssd-small", 4, threads, SSD_MAX_BATCH_DELAY_MS="0", **limits) as off:
        urls = {"on": on, "off": off}
        for url in urls.values():
            drive(url, "/detect", body, "application/json", 2, 0, min_requests=3)  # warm-up
        for clients in CLIENTS:
            for route in ("/detect", "v2"):
                for mode, url in urls.items():
                    images_before, forwards_before = forwards(url)
                    if route == "/detect":
                        result = drive(url, "/detect", body, "application/json", clients, seconds)
                    else:
                        result = run_clients(_triton_sender(url.removeprefix("http://"), png), clients, seconds)
                    images_after, forwards_after = forwards(url)
                    result["mean_batch"] = (images_after - images_before) / max(1.0, forwards_after - forwards_before)
                    rows[route, mode, clients] = result
            bare[clients] = bare_rate(model, image, clients, seconds)
        bare[LIMIT] = bare_rate(model, image, LIMIT, seconds)
    load_after = os.getloadavg()
    print(f"\n## Dynamic batching: ssd-small, 1 PNG 256x256 per request, {seconds:.0f} s per row, torch threads "
          f"{threads}, {os.cpu_count()} CPUs; load average before {load_before[0]:.1f}, after {load_after[0]:.1f}\n")
    print("| clients N | route | batching | requests | images/s | p50 ms | p99 ms | mean batch |")
    print("|---|---|---|---|---|---|---|---|")
    for clients in CLIENTS:
        for route, name in (("/detect", "/detect JSON"), ("v2", "v2 infer, tritonclient binary")):
            for mode in ("on", "off"):
                r = rows[route, mode, clients]
                print(f"| {clients} | {name} | {mode} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
                      f"{r['p99_ms']:.1f} | {r['mean_batch']:.1f} |")
    print("\n| bare batch | images/s | p50 ms per batch | min ms per batch |")
    print("|---|---|---|---|")
    for batch, r in bare.items():
        print(f"| {batch} | {r['ips']:.1f} | {r['p50_ms']:.1f} | {r['min_ms']:.1f} |")
    on8, off8 = rows["/detect", "on", 8]["rps"], rows["/detect", "off", 8]["rps"]
    p99_on, p99_off = rows["/detect", "on", 1]["p99_ms"], rows["/detect", "off", 1]["p99_ms"]
    print(f"\n8 clients, batching on / bare batch 8: {on8 / bare[8]['ips']:.2f} (goal >= 0.8)")
    print(f"8 clients, batching on / off: {on8 / off8:.2f}x (goal >= 1.5x)")
    print(f"1 client p99: on {p99_on:.1f} ms, off {p99_off:.1f} ms, difference {p99_on - p99_off:+.1f} ms "
          f"(goal <= +{DELAY_MS} ms)")
    v2_on8 = rows["v2", "on", 8]["rps"]
    print(f"8 clients, v2 tritonclient binary / /detect JSON (batching on): {v2_on8 / on8:.2f}")
