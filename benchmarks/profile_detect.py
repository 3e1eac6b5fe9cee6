"""Where a `/detect` request's time goes: py-spy samples a live server (ssd-small, one 256x256 PNG per request,
JSON) while 1 and then N clients send requests, and prints the share of the server's busy samples per part of
the request path (the innermost matching frame of each sample decides its part).

Needs py-spy (`pip install py-spy`; sampling another process may need root or CAP_SYS_PTRACE).
Run: `python benchmarks/profile_detect.py [--backend torch|onnxruntime] [--revision REV] [--clients 1 8]`;
`--revision` profiles a server of that git revision's tree instead (before/after).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_service  # noqa: E402
import service_backends  # noqa: E402

from ssd_core.data.images import encode_png  # noqa: E402
from ssd_core.data.synthetic import ShapesDataset  # noqa: E402

# (part, substrings of a frame "function (file:line)"), the innermost matching frame of a sample decides
PARTS = (
    ("forward", ("ssd_core/models/small.py", "ssd_core/models/base.py", "torch/nn/modules/", "OnnxRunner",
                 "onnxruntime")),
    ("detections (decode, NMS)", ("postprocess.py",)),
    ("image decoding", ("decode_image_bytes", "image_dimensions")),
    ("resize and normalise", ("to_model_input", "model_inputs")),
    ("body parsing (JSON, base64, multipart)", ("parse_json", "model_validate_json", "pydantic", "multipart")),
    ("answer encoding", ("orjson", "detections_json", "serialize_response", "jsonable_encoder")),
    ("batch queue", ("batching.py",)),
    ("metrics", ("prometheus_client",)),
    ("HTTP server, asyncio, thread hand-offs", ("uvicorn", "h11", "httptools", "asyncio", "starlette", "anyio",
                                                "fastapi", "threading.py", "queue.py", "concurrent/futures")),
)


def shares(raw: Path) -> list[tuple[str, float]]:
    """(part, share of samples) from py-spy's raw (collapsed) output, largest first."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        part = "other"
        for frame in reversed(stack.split(";")):
            part = next((name for name, keys in PARTS if any(key in frame for key in keys)), "")
            if part:
                break
        counts[part or "other"] += int(count)
    total = sum(counts.values()) or 1
    return [(part, count / total) for part, count in counts.most_common()]


def server_pid(port: str) -> int:
    """The pid of the process listening on `port` (the server started by `live_server`)."""
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split("pid=")[1].split(",")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="torch", help="SSD_BACKEND of the server (ignored with --revision)")
    parser.add_argument("--revision", default=None, help="profile a server of this git revision instead")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=1, help="SSD_TORCH_THREADS")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    png = encode_png(ShapesDataset(1, image_size=256, seed=1)[0].image)
    body = json.dumps({"images": [{"image": base64.b64encode(png).decode()}]}).encode()
    env = {"SSD_MAX_BATCH_DELAY_MS": "5", "SSD_MAX_BATCH_IMAGES": str(max(args.clients))}
    with contextlib.ExitStack() as stack:
        if args.revision:
            cwd, name = stack.enter_context(service_backends.revision_tree(args.revision, REPO)), args.revision
        else:
            cwd, name = REPO, f"SSD_BACKEND={args.backend}"
            env["SSD_BACKEND"] = args.backend
        url = stack.enter_context(bench_service.live_server("ssd-small", 4, args.threads, cwd=cwd, **env))
        pid = server_pid(url.rsplit(":", 1)[1])
        bench_service.drive(url, "/detect", body, "application/json", 2, 0, min_requests=5)  # warm-up
        for clients in args.clients:
            raw = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "stacks.txt"
            sampler = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)),
                                        "--rate", "200", "--format", "raw", "--output", str(raw), "--nonblocking",
                                        "--threads"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # py-spy attaches
            result = bench_service.drive(url, "/detect", body, "application/json", clients, args.seconds - 1)
            sampler.wait()
            print(f"\n### {name}, {clients} client(s): {result['rps']:.1f} images/s, p50 {result['p50_ms']:.1f} ms\n")
            print("| part of the request path | share of the server's busy samples |")
            print("|---|---|")
            for part, share in shares(raw):
                print(f"| {part} | {100 * share:.1f}% |")


if __name__ == "__main__":
    main()
