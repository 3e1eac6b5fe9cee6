"""ONNX Runtime vs torch eager on CPU: ms per image of the exported network (not a timed test).

For ssd-small and ssd300 at batch 1 and 8: the model exported with `ssd_core.models.export` (ONNX), run by
`onnxruntime` (CPUExecutionProvider, intra-op threads = torch's), against the same weights in torch eager
(`inference_mode`), and the TorchScript export. Repeats interleave the runtimes so load drift hits all
alike; medians and minima in ms per image, and the load average.
Run: `python benchmarks/bench_export.py [--repeats 10] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssd_core.models import build_model  # noqa: E402
from ssd_core.models.export import export_model  # noqa: E402

MODELS = {"ssd-small": 4, "ssd300": 21}


def runners(name: str, directory: Path, threads: int) -> dict:
    """runtime name -> function(images [B, 3, S, S]) running the network."""
    model = build_model(name, MODELS[name]).eval()
    onnx_path = export_model(model, directory / f"{name}.onnx", "onnx")
    script_path = export_model(model, directory / f"{name}.pt", "torchscript")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates TorchScript
        scripted = torch.jit.load(str(script_path), map_location="cpu")

    def eager(images: torch.Tensor) -> None:
        with torch.inference_mode():
            model(images)

    def torchscript(images: torch.Tensor) -> None:
        with torch.inference_mode():
            scripted(images)

    def ort(images: torch.Tensor) -> None:
        session.run(None, {"images": images.numpy()})

    return {"torch eager": eager, "torchscript": torchscript, "onnxruntime": ort}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name in MODELS:
            run = runners(name, Path(directory), args.threads)
            size = build_model(name, MODELS[name]).spec.image_size
            for batch in (1, 8):
                images = torch.randn(batch, 3, size, size)
                for fn in run.values():  # warm-up
                    fn(images)
                times: dict[str, list[float]] = {runtime: [] for runtime in run}
                for _ in range(args.repeats):
                    for runtime, fn in run.items():
                        start = time.perf_counter()
                        fn(images)
                        times[runtime].append(1000 * (time.perf_counter() - start) / batch)
                rows.append((name, batch, times))
    print(f"\nms per image, {args.repeats} interleaved repeats, {args.threads} threads, {os.cpu_count()} CPUs; "
          f"load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f}\n")
    print("| model | B | runtime | median ms/image | min ms/image | eager / runtime (median) |")
    print("|---|---|---|---|---|---|")
    for name, batch, times in rows:
        eager = statistics.median(times["torch eager"])
        for runtime, values in times.items():
            median = statistics.median(values)
            print(f"| {name} | {batch} | {runtime} | {median:.1f} | {min(values):.1f} | {eager / median:.2f}x |")


if __name__ == "__main__":
    main()
