"""The serving table of `bench_service.py --part backends`: `/detect` over HTTP against the bare in-process
forward + post-processing of the same backend, torch and ONNX Runtime, in one run.

For each backend a live server (`SSD_BACKEND`, dynamic batching on) answers one 256x256 PNG per request with
1 and N concurrent clients (JSON base64 and multipart), and the same decoded image runs in process through
`model_inputs`, the backend's forward and `detect` at batch 1 and N: what the request path adds is the gap
between the two. With `--baseline REV` a server of git revision REV (its whole tree, `git archive`) runs the
same rows, so that before and after share every load fluctuation. Rows interleave (each backend, then the
bare rates, for each client count), `--rounds` times over; each row reports the median of its rounds and their
range, since on two shared cores one row of a few seconds can swing by a quarter.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import torch

from app.serving.backends import OnnxGraph, TorchRunner
from ssd_core.data.images import encode_png, model_inputs
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.models import build_model
from ssd_core.models.postprocess import detect_with_spec

SCORE_THRESHOLD = 0.3


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


@contextlib.contextmanager
def revision_tree(revision: str, repo: Path) -> Iterator[Path]:
    """The tree of git revision `revision` in a temporary directory."""
    archive = subprocess.run(["git", "archive", revision], cwd=repo, check=True, capture_output=True).stdout
    with tempfile.TemporaryDirectory() as directory, tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
        yield Path(directory)


def bare_runner(backend: str, model, device: torch.device, threads: int) -> Callable:
    if backend == "onnxruntime":
        return OnnxGraph(model, device, threads).runner(model)
    return TorchRunner(model, device)


def bare_rate(runner: Callable, model, image: torch.Tensor, batch: int, seconds: float) -> dict[str, float]:
    """In-process images/s of `model_inputs`, the runner's forward and `detect` on `batch` decoded images."""
    images, times = [image] * batch, []
    priors = model.priors
    stop_at = time.monotonic() + seconds
    with torch.inference_mode():
        while time.monotonic() < stop_at or len(times) < 4:
            start = time.perf_counter()
            loc, conf = runner(model_inputs(images, model.spec))
            detect_with_spec(model.spec, loc, conf, priors.to(loc.device), score_threshold=SCORE_THRESHOLD,
                             max_detections=100, image_sizes=[(image.shape[1], image.shape[2])] * batch)
            if loc.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    ordered = times[1:]  # the first call warms up
    return {"ips": batch / statistics.median(ordered), "p50_ms": 1000 * statistics.median(ordered)}


def median_row(runs: list[dict[str, float]]) -> dict[str, float]:
    """One row from its rounds: the median of each figure, `requests` summed, and the throughput's range
    (`rps_low`/`rps_high` or `ips_low`/`ips_high`)."""
    row = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    if "requests" in row:
        row["requests"] = sum(run["requests"] for run in runs)
    rate = "rps" if "rps" in row else "ips"
    row[f"{rate}_low"], row[f"{rate}_high"] = min(run[rate] for run in runs), max(run[rate] for run in runs)
    return row


def multipart_sender(url: str, png: bytes) -> Callable:
    @contextlib.contextmanager
    def sender() -> Iterator[Callable[[], None]]:
        with httpx.Client(base_url=url, timeout=600) as http:
            def send() -> None:
                response = http.post("/detect", files=[("images", ("a.png", png, "image/png"))])
                if response.status_code != 200:
                    raise RuntimeError(f"/detect: {response.status_code} {response.text[:300]}")
            yield send

    return sender


def run(live_server, drive, run_clients, args) -> None:
    """Measure and print the table (see the module docstring)."""
    load_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    image = ShapesDataset(1, image_size=256, seed=1)[0].image
    png = encode_png(image)
    body = json.dumps({"images": [{"image": base64.b64encode(png).decode()}]}).encode()
    model = build_model(args.model, args.num_classes).eval().to(device)
    clients = (1, args.many_clients)
    env = {"SSD_DEVICE": args.device, "SSD_MAX_BATCH_DELAY_MS": str(args.delay_ms),
           "SSD_MAX_BATCH_IMAGES": str(max(clients))}
    servers = {backend: {"SSD_BACKEND": backend} for backend in args.backends}
    rows: dict[tuple[str, str, int], list[dict[str, float]]] = collections.defaultdict(list)
    bare: dict[tuple[str, int], list[dict[str, float]]] = collections.defaultdict(list)
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, extra in servers.items():
            urls[name] = stack.enter_context(live_server(args.model, args.num_classes, args.threads, **env, **extra))
        if args.baseline:
            tree = stack.enter_context(revision_tree(args.baseline, Path(__file__).resolve().parents[1]))
            urls[f"{args.baseline} (torch)"] = stack.enter_context(  # since 28b772d the default backend is auto
                live_server(args.model, args.num_classes, args.threads, cwd=tree, **env, SSD_BACKEND="torch"))
        runners = {backend: bare_runner(backend, model, device, args.threads) for backend in args.backends}
        for url in urls.values():
            drive(url, "/detect", body, "application/json", 2, 0, min_requests=4)  # warm-up
        for _ in range(args.rounds):
            for n in clients:
                for name, url in urls.items():
                    rows[name, "json", n].append(drive(url, "/detect", body, "application/json", n, args.seconds))
                    rows[name, "multipart", n].append(run_clients(multipart_sender(url, png), n, args.seconds))
                for backend, runner in runners.items():
                    bare[backend, n].append(bare_rate(runner, model, image, n, args.seconds))
    load_after = os.getloadavg()
    rows = {key: median_row(runs) for key, runs in rows.items()}
    bare = {key: median_row(runs) for key, runs in bare.items()}
    print(f"\n## Serving backends: {args.model} on {args.device}, 1 PNG {image.shape[2]}x{image.shape[1]} per request, "
          f"score threshold {SCORE_THRESHOLD}, batch delay {args.delay_ms} ms, {args.seconds:.0f} s per row, "
          f"median of {args.rounds} interleaved rounds, threads {args.threads}, "
          f"{os.cpu_count()} CPUs ({cpu_model()}); load average before {load_before[0]:.2f}, after "
          f"{load_after[0]:.2f}\n")
    print("| server | body | clients | requests | images/s | range | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for n in clients:
        for name in urls:
            for kind in ("json", "multipart"):
                r = rows[name, kind, n]
                print(f"| {name} | {kind} | {n} | {r['requests']:.0f} | {r['rps']:.1f} | {r['rps_low']:.1f}-"
                      f"{r['rps_high']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    print("\n| bare (in process) | batch | images/s | range | p50 ms per batch |")
    print("|---|---|---|---|---|")
    for (backend, n), r in bare.items():
        print(f"| {backend} | {n} | {r['ips']:.1f} | {r['ips_low']:.1f}-{r['ips_high']:.1f} | {r['p50_ms']:.1f} |")
    print()
    n = args.many_clients
    for backend in args.backends:
        for kind in ("json", "multipart"):
            one = rows[backend, kind, 1]["rps"] / bare[backend, 1]["ips"]
            many = rows[backend, kind, n]["rps"] / bare[backend, n]["ips"]
            torch_many = rows[backend, kind, n]["rps"] / bare.get(("torch", n), bare[backend, n])["ips"]
            print(f"{backend} {kind}: 1 client / bare batch 1 {one:.2f} (goal >= 0.8); {n} clients / bare batch {n} "
                  f"{many:.2f}; {n} clients / bare batch-{n} torch {torch_many:.2f} (goal >= 0.9)")
    if {"torch", "onnxruntime"} <= set(args.backends):
        for kind in ("json", "multipart"):
            for m in clients:
                ratio = rows["onnxruntime", kind, m]["rps"] / rows["torch", kind, m]["rps"]
                print(f"onnxruntime / torch over HTTP, {kind}, {m} clients: {ratio:.2f}x (goal >= 1.5x on CPU)")
    if args.baseline:
        for kind in ("json", "multipart"):
            for m in clients:
                ratio = rows["torch", kind, m]["rps"] / rows[f"{args.baseline} (torch)", kind, m]["rps"]
                print(f"torch now / {args.baseline}, {kind}, {m} clients: {ratio:.2f}x")
