"""Held-out mAP@0.5 served by torch and by ONNX Runtime on the same weights, over HTTP (not a timed test).

`SSD_BACKEND=auto` (the default) serves a CPU deployment with ONNX Runtime; training, the gate and
screening stay in torch, so what changes is only what computes the `POST /detect` answers. This measures it
as the user meets it, side by side on the same published version:

1. a young deployment: a server (`SSD_BACKEND=torch`, the defaults otherwise) from an EMPTY checkpoint
   directory learns from `--jobs` clean `POST /finetune` jobs (`--job-images` `split="train"` images x
   `--job-steps` steps), then saves its version (`POST /model/checkpoint`); a torch and a default (`auto`)
   server start from copies of that directory;
2. the operating point: a torch and a default server on the shipped demo model (`SSD_WEIGHTS=demo`).

For each pair: served mAP@0.5 overall and per class from `POST /detect` on `--eval-images` `split="val"`
images (score threshold 0.01, 100 boxes), and the largest difference of a detection's score and box
coordinate between the two answers. Prints the table; `--out` gets `backend_map.json`.
Run: `nice -n 10 python benchmarks/bench_backend_map.py [--jobs 25]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
from bench_online import REPO, Stream, answers_map, detect_answers, held_out_images, post_job, start_server

from ssd_core.data.synthetic import CLASS_NAMES

BACKENDS = {"torch": {"SSD_BACKEND": "torch"}, "default (auto)": {}}


def largest_difference(first: list[list[dict]], second: list[list[dict]]) -> dict[str, float]:
    """The largest |score| and |box coordinate| difference between two answers of the same images, taking the
    detections of an image in order, and the detections one answer has beyond the other (a score at the
    threshold can fall on either side of it). Detections of equal score may come in either order: a barely
    trained model's many ties then show as a box difference while the scores agree."""
    score = box = 0.0
    unmatched = 0
    for one, other in zip(first, second, strict=True):
        unmatched += abs(len(one) - len(other))
        for a, b in zip(one, other, strict=False):
            if a["label"] != b["label"]:
                unmatched += 1
                continue
            score = max(score, abs(a["score"] - b["score"]))
            box = max(box, *(abs(x - y) for x, y in zip(a["box"], b["box"], strict=True)))
    return {"score": score, "box_px": box, "unmatched": unmatched}


def compare(name: str, checkpoints: Path | None, args: argparse.Namespace, val, encoded, **env: str) -> dict:
    """Start a torch and a default server on copies of `checkpoints` (None: empty directories) and measure both."""
    measured, answers = {}, {}
    with tempfile.TemporaryDirectory(dir=args.work) as work, contextlib.ExitStack() as stack:
        servers = {}
        for backend, backend_env in BACKENDS.items():
            directory = Path(work) / backend.split()[0] / "checkpoints"
            if checkpoints is not None:
                shutil.copytree(checkpoints, directory)
            servers[backend] = stack.enter_context(
                start_server(f"{name}-{backend.split()[0]}", directory, args.threads, **env, **backend_env))
        for backend, server in servers.items():
            served_by = httpx.get(f"{server.url}/model", timeout=30).json()["backend"]
            answers[backend], versions = detect_answers(server, encoded)
            measured[backend] = {**answers_map(answers[backend], versions, val), "served_by": served_by}
    versions = {m["version"] for m in measured.values()}
    if len(versions) != 1:
        raise RuntimeError(f"{name}: the servers serve different versions {versions}")
    return {"deployment": name, "backends": measured, "difference": largest_difference(*answers.values())}


def young_checkpoints(args: argparse.Namespace) -> Path:
    """A torch server learns from fresh over `--jobs` clean jobs; its checkpoint directory."""
    directory = args.work / "young" / "checkpoints"
    shutil.rmtree(directory.parent, ignore_errors=True)
    stream = Stream(256, seed=0)
    with start_server("young-train", directory, args.threads, SSD_BACKEND="torch") as server:
        for job in range(args.jobs):
            view = post_job(server, stream.take(args.job_images), args.job_steps, None)
            print(f"job {job + 1}: {view['status']}, version {view.get('model_version')}", flush=True)
        httpx.post(f"{server.url}/model/checkpoint", timeout=120).raise_for_status()
    return directory


def report(rows: list[dict]) -> str:
    lines = ["| deployment | server | served by | version | mAP@0.5 | " + " | ".join(CLASS_NAMES) + " |",
             "|---|---|---|---|---|" + "---|" * len(CLASS_NAMES)]
    for row in rows:
        for backend, m in row["backends"].items():
            per_class = " | ".join(f"{m['per_class'][c]:.4f}" for c in CLASS_NAMES)
            lines.append(f"| {row['deployment']} | {backend} | {m['served_by']} | {m['version']} | {m['map_50']:.4f} | "
                         f"{per_class} |")
    lines.append("")
    for row in rows:
        d = row["difference"]
        torch_map, default_map = (m["map_50"] for m in row["backends"].values())
        lines.append(f"{row['deployment']}: mAP@0.5 default - torch {default_map - torch_map:+.4f}; largest score "
                     f"difference {d['score']:.2e}, box {d['box_px']:.2e} px; detections in one answer only "
                     f"{d['unmatched']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=25)
    parser.add_argument("--job-images", type=int, default=8)
    parser.add_argument("--job-steps", type=int, default=4)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="SSD_TORCH_THREADS of each server")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_backend_map"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serving")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"bench_backend_map {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()}",
          flush=True)
    val, encoded = held_out_images(args.eval_images)
    rows = [compare(f"young ({args.jobs} jobs)", young_checkpoints(args), args, val, encoded),
            compare("operating point (demo model)", None, args, val, encoded, SSD_WEIGHTS="demo")]
    (args.out / "backend_map.json").write_text(json.dumps(rows, indent=1))
    print(report(rows))
    print(f"load {os.getloadavg()}")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
