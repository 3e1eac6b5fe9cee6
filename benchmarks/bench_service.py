"""Service throughput against a live server on loopback with concurrent clients (not a timed test).

* `/score-loss` requests/s and p50/p99 latency, JSON and binary (safetensors) bodies, B = 1 and 8,
  SSD300 VOC priors (P = 8732), C = 21: the server runs `SSD_MODEL=ssd300` (role `all`, idle trainer).
* `/detect` images/s with the small model (a second server, `SSD_MODEL=ssd-small`).
* The server's overhead for B = 8 binary: interleaved (request, in-process `MultiBoxLoss.compute` on the
  same tensors) pairs; 1 - loss time / request time, with the request timed at the client and inside the
  server (its own latency histogram, read around each request), from medians and from minima.

* Dynamic batching (issue 12): `/detect` with N concurrent clients x 1 image per request, N in {1, 4, 8,
  16}, batching on (`SSD_MAX_BATCH_DELAY_MS=5`, up to 32 images) and off (`0`), the same images through
  the Open Inference Protocol with `tritonclient` (BYTES PNG, binary), and the in-process bare forward
  + post-processing (`model_inputs`, the model, `detect`) at batch sizes N and 32 (the limit).

* Serving backends (`--part backends`, `service_backends.py`): `/detect` over HTTP with 1 and N clients
  (JSON and multipart), SSD_BACKEND torch and onnxruntime (and with `--baseline REV` a server of that git
  revision), against the bare in-process forward + post-processing of the same backend at batch 1 and N;
  `--device cuda --model ssd300` for the GPU table.

Goals (issue 4): binary >= 5x the JSON throughput; B = 8 binary overhead < 25% of the request time.
Goals (issue 12, 2 CPU cores): 8 clients >= 0.8x the bare batch-8 throughput and >= 1.5x batching off;
1 client: p99 with batching no worse than off by more than the delay.
Goals (serving at the speed of the hardware): 8 clients >= 0.9 of the bare batch-8 torch forward; 1 client >= 0.8
of the bare batch-1 forward; onnxruntime >= 1.5x torch over HTTP on CPU.
Run: `python benchmarks/bench_service.py [--clients 4] [--seconds 8] [--threads 1] [--part all|loss|batching|backends]`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import safetensors.torch
import torch
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssd_core import VOC_300, MultiBoxLoss, prior_boxes  # noqa: E402
from ssd_core.data.images import encode_png  # noqa: E402
from ssd_core.data.synthetic import ShapesDataset  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import service_backends  # noqa: E402
import service_batching  # noqa: E402

NUM_CLASSES = 21


@contextlib.contextmanager
def live_server(model: str, num_classes: int, threads: int, cwd: Path = REPO, **env: str) -> Iterator[str]:
    """`python -m app` on a free loopback port (role all: a server-only replica waits for a trainer's checkpoint; temporary checkpoint dir); SIGTERM at exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as checkpoints:
        env = {**os.environ, "SSD_MODEL": model, "SSD_NUM_CLASSES": str(num_classes), "SSD_ROLE": "all",
               "SSD_CHECKPOINT_DIR": checkpoints, "SSD_HOST": "127.0.0.1", "SSD_PORT": str(port),
               "SSD_TORCH_THREADS": str(threads), "SSD_MAX_IMAGES_PER_REQUEST": "64", **env}
        process = subprocess.Popen([sys.executable, "-m", "app"], cwd=cwd, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{model} server did not become ready")
                time.sleep(0.3)
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def random_batch(batch: int, seed: int = 0):
    """loc [B, 8732, 4], conf [B, 8732, 21], targets [B, 3, 6] padded (normalised xyxy, label, difficult)."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, 8732, 4, generator=g)
    conf = torch.randn(batch, 8732, NUM_CLASSES, generator=g)
    xy = torch.rand(batch, 3, 2, generator=g) * 0.5
    wh = 0.1 + torch.rand(batch, 3, 2, generator=g) * 0.4
    labels = torch.randint(0, NUM_CLASSES - 1, (batch, 3, 1), generator=g).float()
    targets = torch.cat((xy, xy + wh, labels, torch.zeros(batch, 3, 1)), dim=-1)
    return loc, conf, targets


def bodies(batch: int) -> dict[str, tuple[bytes, str]]:
    """The same request as a JSON and as a safetensors body (serialised once, outside the timing)."""
    loc, conf, targets = random_batch(batch)
    as_json = {
        "predictions": {"loc": loc.tolist(), "conf": conf.tolist()},
        "targets": [[{"box": row[:4], "label": int(row[4])} for row in image.tolist()] for image in targets],
    }
    return {
        "json": (json.dumps(as_json).encode(), "application/json"),
        "binary": (safetensors.torch.save({"loc": loc, "conf": conf, "targets": targets}), "application/octet-stream"),
    }


def run_clients(make_sender, clients: int, seconds: float, min_requests: int = 3) -> dict[str, float]:
    """`clients` threads send requests back to back for about `seconds`; requests/s and latency percentiles.

    Args:
        make_sender: called once per thread; a context manager yielding a function that sends one request.
    """
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        with make_sender() as send:
            done = 0
            while time.monotonic() < stop_at or done < min_requests:
                start = time.perf_counter()
                send()
                elapsed = time.perf_counter() - start
                done += 1
                with lock:
                    latencies.append(elapsed)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "rps": len(ordered) / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def drive(url: str, path: str, body: bytes, content_type: str, clients: int, seconds: float,
          min_requests: int = 3) -> dict[str, float]:
    """`clients` threads post `body` to `path` back to back for about `seconds`."""

    @contextlib.contextmanager
    def sender() -> Iterator:
        with httpx.Client(base_url=url, timeout=600, headers={"Content-Type": content_type}) as http:
            def send() -> None:
                response = http.post(path, content=body)
                if response.status_code != 200:
                    raise RuntimeError(f"{path}: {response.status_code} {response.text[:300]}")
            yield send

    return run_clients(sender, clients, seconds, min_requests)


def overhead_run(url: str, batch: int, repeats: int) -> dict[str, list[float]]:
    """`repeats` interleaved triples on the same B-image tensors, so that load drift hits all alike: one
    binary request (timed at the client, and inside the server from its own latency histogram read
    before and after it), then one in-process loss (`MultiBoxLoss.compute` under inference_mode).
    Returns the milliseconds of each: request, server, loss."""
    loc, conf, targets = random_batch(batch)
    priors = prior_boxes(VOC_300)
    criterion = MultiBoxLoss.ssd_pytorch(NUM_CLASSES)
    body = safetensors.torch.save({"loc": loc, "conf": conf, "targets": targets})
    times: dict[str, list[float]] = {"request": [], "server": [], "loss": []}
    with httpx.Client(base_url=url, timeout=600, headers={"Content-Type": "application/octet-stream"}) as http:
        for _ in range(3):  # warm-up
            http.post("/score-loss", content=body)
        for _ in range(repeats):
            before = server_seconds(url)
            start = time.perf_counter()
            assert http.post("/score-loss", content=body).status_code == 200
            times["request"].append(1000 * (time.perf_counter() - start))
            after = server_seconds(url)
            assert after[1] - before[1] == 1, "another client used the server"
            times["server"].append(1000 * (after[0] - before[0]))
            start = time.perf_counter()
            with torch.inference_mode():
                criterion.compute((loc, conf, priors), targets)
            times["loss"].append(1000 * (time.perf_counter() - start))
    return times


def overhead_lines(times: dict[str, list[float]]) -> list[str]:
    """Overhead = 1 - loss / request time, from medians and from minima (the least disturbed runs)."""
    lines = []
    for name, label in (("request", "request at the client"), ("server", "time in the server (its histogram)")):
        for stat, reduce in (("median", statistics.median), ("min", min)):
            loss, total = reduce(times["loss"]), reduce(times[name])
            lines.append(f"| {label} | {stat} | {loss:.1f} | {total:.1f} | {100 * (1 - loss / total):.0f}% |")
    return lines


def server_seconds(url: str) -> tuple[float, float]:
    """(sum, count) of the server's own /score-loss POST latency histogram (body receipt to response)."""
    labels = {"route": "/score-loss", "method": "POST"}
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.labels == labels and sample.name.startswith("ssd_http_request_duration_seconds_"):
                values[sample.name.rsplit("_", 1)[1]] = sample.value
    return values["sum"], values["count"]


def detect_body(images: int) -> bytes:
    shapes = ShapesDataset(images, image_size=256, seed=1)
    encoded = [{"image": base64.b64encode(encode_png(shapes[i].image)).decode()} for i in range(images)]
    return json.dumps({"images": encoded}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and in-process")
    parser.add_argument("--repeats", type=int, default=40, help="interleaved request/loss pairs for the overhead")
    parser.add_argument("--detect-batch", type=int, default=4, help="images per /detect request")
    parser.add_argument("--part", choices=["all", "loss", "batching", "backends"], default="all",
                        help="loss: the /score-loss and /detect tables; batching: the dynamic batching table; "
                        "backends: the serving backends table (not part of all)")
    parser.add_argument("--many-clients", type=int, default=8, help="backends: the concurrent client count")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"], help="backends: SSD_BACKEND values")
    parser.add_argument("--baseline", default=None, help="backends: also a torch server of this git revision")
    parser.add_argument("--model", default="ssd-small", help="backends: SSD_MODEL")
    parser.add_argument("--num-classes", type=int, default=4, help="backends: SSD_NUM_CLASSES")
    parser.add_argument("--device", default="cpu", help="backends: SSD_DEVICE and the bare forward's device")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="backends: SSD_MAX_BATCH_DELAY_MS")
    parser.add_argument("--rounds", type=int, default=3, help="backends: interleaved rounds, each row their median")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "backends":
        service_backends.run(live_server, drive, run_clients, args)
        return
    if args.part != "loss":
        service_batching.run(live_server, drive, run_clients, args.threads, args.seconds)
    if args.part == "batching":
        return
    load_before = os.getloadavg()[0]

    rows = []
    with live_server("ssd300", NUM_CLASSES, args.threads) as url:
        for batch in (1, 8):
            for kind, (body, content_type) in bodies(batch).items():
                drive(url, "/score-loss", body, content_type, 1, 0, min_requests=1)  # warm-up
                result = drive(url, "/score-loss", body, content_type, args.clients, args.seconds)
                rows.append((f"/score-loss {kind}", batch, len(body), result))
        overhead = overhead_run(url, 8, args.repeats)
    with live_server("ssd-small", 4, args.threads) as url:
        body = detect_body(args.detect_batch)
        drive(url, "/detect", body, "application/json", 1, 0, min_requests=1)
        detect = drive(url, "/detect", body, "application/json", args.clients, args.seconds)

    print(f"\n{args.clients} concurrent clients, {args.seconds:.0f} s per row, torch threads {args.threads}, "
          f"{os.cpu_count()} CPUs\n")
    print("| endpoint | B | body MB | requests | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, batch, size, r in rows:
        print(f"| {name} | {batch} | {size / 1e6:.1f} | {r['requests']} | {r['rps']:.2f} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} |")
    print(f"| /detect ssd-small (JSON, {args.detect_batch} PNG 256x256) | {args.detect_batch} | {len(body) / 1e6:.2f} | "
          f"{detect['requests']} | {detect['rps']:.2f} ({detect['rps'] * args.detect_batch:.1f} images/s) | "
          f"{detect['p50_ms']:.0f} | {detect['p99_ms']:.0f} |")
    by = {(name, batch): r for name, batch, _, r in rows}
    print()
    for batch in (1, 8):
        ratio = by["/score-loss binary", batch]["rps"] / by["/score-loss json", batch]["rps"]
        print(f"binary / JSON throughput, B={batch}: {ratio:.1f}x (goal >= 5x)")
    print(f"\nB=8 binary, one client, {args.repeats} interleaved (request, bare loss) pairs; load average "
          f"{os.getloadavg()[0]:.1f} (before the run {load_before:.1f}); overhead goal < 25%\n")
    print("| request time | statistic | bare loss ms | request ms | overhead |")
    print("|---|---|---|---|---|")
    print("\n".join(overhead_lines(overhead)))


if __name__ == "__main__":
    main()
