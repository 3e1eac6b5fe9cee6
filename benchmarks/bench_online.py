"""Online learning over HTTP with and without the publish gate (not a timed test).

Live servers (`python -m app`, `ssd-small`, CPU), HTTP only, `ShapesDataset` images:

1. warm-up: ONE server from a fresh checkpoint directory (`SSD_PUBLISH=every_step`, no holdout) takes
   fine-tune jobs until the served mAP@0.5 on held-out `split="val"` images reaches `--warm-map` (or
   `--warm-minutes` pass); its checkpoint directory is kept (`--warm-dir`; a later run resumes it).
2. two servers start from copies of it, `every_step` and `gated` (the defaults otherwise), and get
   the same 200 validation images over `POST /validation` (`split="validation"`, not the measured split);
3. both get the same jobs in turn (`--job-images` images x `--job-steps` steps, `--lr` if given): (a) 3 jobs with
   boxes shifted right and down by half their size, (b) 3 with labels rotated to the next class,
   (c) `--clean-jobs` clean jobs, (d) (a) and (b) again, now that the gated server has a screening window;
   after every job, both servers' served mAP@0.5 overall and per class from `POST /detect` answers on
   `--eval-images` `split="val"` images (torchmetrics).

Prints one row per job, the goals met or missed, and writes `benchmarks/results/online/`
(`history.json`, `served_map.png`, `bench_online.log` via the caller's redirection).
Run: `nice -n 10 python benchmarks/bench_online.py [--clean-jobs 50]`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssd_core.data.datasets import Sample  # noqa: E402
from ssd_core.data.images import encode_png  # noqa: E402
from ssd_core.data.synthetic import CLASS_NAMES, ShapesDataset  # noqa: E402
from ssd_core.evaluation.mean_ap import average_precision_50  # noqa: E402
from ssd_core.evaluation.plotting import save_curves  # noqa: E402
from ssd_core.models.postprocess import Detections  # noqa: E402

REQUEST_IMAGES = 32  # SSD_MAX_IMAGES_PER_REQUEST's default
GOAL_MAP_DROP = 0.02


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="SSD_TORCH_THREADS of each server")
    parser.add_argument("--warm-dir", type=Path, default=Path("/tmp/bench_online/warm"))
    parser.add_argument("--warm-map", type=float, default=0.7)
    parser.add_argument("--warm-weights", default=None,
                        help="SSD_WEIGHTS of the warm-up server (`demo`: start from the shipped demo model)")
    parser.add_argument("--warm-minutes", type=float, default=15.0)
    parser.add_argument("--warm-images", type=int, default=16)
    parser.add_argument("--warm-steps", type=int, default=10)
    parser.add_argument("--warm-lr", type=float, default=0.05)
    parser.add_argument("--job-images", type=int, default=8)
    parser.add_argument("--job-steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None,
                        help="learning_rate sent with each job; default: none sent, the service's recipe "
                             "(the issue's runs sent 0.02 to the SGD recipe of the time)")
    parser.add_argument("--clean-jobs", type=int, default=50)
    parser.add_argument("--corrupt-jobs", type=int, default=3, help="jobs of each corruption in (a), (b) and (d)")
    parser.add_argument("--repeat-corrupt", type=int, choices=(0, 1), default=1, help="0: no (d)")
    parser.add_argument("--eval-images", type=int, default=96)
    parser.add_argument("--validation-images", type=int, default=200)
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="SSD_HOLDOUT_FRACTION of both servers (> 0: the validation set changes as jobs end)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "online")
    return parser.parse_args(argv)


# ---- servers


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    process: subprocess.Popen


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def start_server(name: str, checkpoint_dir: Path, threads: int, **env: str) -> Iterator[Server]:
    """`python -m app` (ssd-small, CPU) on `checkpoint_dir` with extra `SSD_*` settings; stopped on exit."""
    port = _free_port()
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "SSD_MODEL": "ssd-small", "SSD_NUM_CLASSES": "4", "SSD_CLASS_NAMES": ",".join(CLASS_NAMES),
        "SSD_DEVICE": "cpu", "SSD_CHECKPOINT_DIR": str(checkpoint_dir), "SSD_HOST": "127.0.0.1",
        "SSD_PORT": str(port), "SSD_TORCH_THREADS": str(threads), "SSD_FINETUNE_MAX_STEPS": "1000", **env,
    }
    log = (checkpoint_dir.parent / f"{name}.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, env={**os.environ, **settings},
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {name} did not start; see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield Server(name, url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


# ---- data


def items(samples: list[Sample]) -> list[dict]:
    """JSON image items of `/finetune` and `/validation`: base64 PNG, pixel boxes, labels."""
    return [{"image": base64.b64encode(encode_png(s.image)).decode(), "boxes": s.boxes.tolist(),
             "labels": s.labels.tolist()} for s in samples]


def shift_boxes(sample: Sample) -> Sample:
    """Boxes moved right and down by half their width and height (clipped to the image): a coordinate bug."""
    boxes = sample.boxes.clone()  # [N, 4] pixel xyxy
    size = boxes[:, 2:] - boxes[:, :2]  # [N, 2]
    height, width = sample.image.shape[-2:]
    boxes[:, :2] += size / 2
    boxes[:, 2:] = torch.minimum(boxes[:, 2:] + size / 2, torch.tensor([float(width), float(height)]))
    return Sample(sample.image, boxes, sample.labels, sample.difficult)


def rotate_labels(sample: Sample) -> Sample:
    """Every label moved to the next class."""
    return Sample(sample.image, sample.boxes, (sample.labels + 1) % len(CLASS_NAMES), sample.difficult)


class Stream:
    """Fresh training images, never repeated: `take(n)` the next n of `split="train"`."""

    def __init__(self, image_size: int, seed: int = 0) -> None:
        self.dataset = ShapesDataset(1_000_000, image_size=image_size, seed=seed, split="train")
        self.position = 0

    def take(self, count: int) -> list[Sample]:
        samples = [self.dataset[i] for i in range(self.position, self.position + count)]
        self.position += count
        return samples


def held_out_images(count: int, seed: int = 0, image_size: int = 256) -> tuple[list[Sample], list[dict]]:
    """The measured `split="val"` images and their JSON items (sent to `POST /detect` by `measure_map`)."""
    samples = [ShapesDataset(count, image_size=image_size, seed=seed, split="val")[i] for i in range(count)]
    return samples, items(samples)


def add_report_arguments(parser: argparse.ArgumentParser, *, jobs: int, eval_images: int, threads: int) -> None:
    """The options the job-stream benchmarks built on this harness share (bench_continual, bench_fresh)."""
    parser.add_argument("--jobs", type=int, default=jobs)
    parser.add_argument("--job-images", type=int, default=8)
    parser.add_argument("--job-steps", type=int, default=4)
    parser.add_argument("--eval-images", type=int, default=eval_images)
    parser.add_argument("--threads", type=int, default=threads, help="SSD_TORCH_THREADS of each server")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "online")
    parser.add_argument("--report", action="store_true", help="print the tables of --out and draw the plots")


def begin_run(name: str, args: argparse.Namespace, report) -> tuple[list[Sample], list[dict]] | None:
    """Makes `--out`; with `--report`, runs `report(out)` and returns None. Otherwise prints the run's header and
    returns the held-out images (`held_out_images(--eval-images)`)."""
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(args.out)
        return None
    held_out = held_out_images(args.eval_images)
    print(f"{name} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()}", flush=True)
    return held_out


# ---- HTTP


def post_job(server: Server, samples: list[Sample], steps: int, lr: float | None, force: bool = False) -> dict:
    """One fine-tune job, waited for; its job view. `lr` None: the service's own learning rate."""
    body = {"images": items(samples), "steps": steps, "force": force}
    if lr is not None:
        body["learning_rate"] = lr
    response = httpx.post(f"{server.url}/finetune", params={"wait": "true"}, json=body, timeout=1800)
    response.raise_for_status()
    return response.json()


def post_validation(server: Server, samples: list[Sample]) -> dict:
    answer = {}
    for start in range(0, len(samples), REQUEST_IMAGES):
        response = httpx.post(f"{server.url}/validation", json={"images": items(samples[start : start + REQUEST_IMAGES])},
                              timeout=300)
        response.raise_for_status()
        answer = response.json()
    return answer


def detect_answers(server: Server, encoded: list[dict]) -> tuple[list[list[dict]], set[int]]:
    """Every image's detections from `POST /detect` (score_threshold 0.01, 100 boxes), and the model versions
    that answered."""
    answers, versions = [], set()
    for start in range(0, len(encoded), REQUEST_IMAGES):
        body = {"images": [{"image": e["image"]} for e in encoded[start : start + REQUEST_IMAGES]],
                "score_threshold": 0.01, "max_detections": 100}
        response = httpx.post(f"{server.url}/detect", json=body, timeout=600)
        response.raise_for_status()
        answer = response.json()
        versions.add(answer["model_version"])
        answers.extend(answer["detections"])
    return answers, versions


def answers_map(answers: list[list[dict]], versions: set[int], samples: list[Sample]) -> dict:
    """mAP@0.5 overall and per class name of `detect_answers`' answers on `samples`."""
    detections = [Detections(
        torch.tensor([d["box"] for d in boxes], dtype=torch.float32).reshape(-1, 4),
        torch.tensor([d["score"] for d in boxes], dtype=torch.float32),
        torch.tensor([d["label"] for d in boxes], dtype=torch.long),
    ) for boxes in answers]
    map_50, per_class = average_precision_50(detections, samples)
    return {"map_50": map_50, "per_class": {CLASS_NAMES[c]: ap for c, ap in per_class.items()},
            "version": max(versions)}


def measure_map(server: Server, samples: list[Sample], encoded: list[dict]) -> dict:
    """Served mAP@0.5 overall and per class name from `POST /detect` (score_threshold 0.01, 100 boxes)."""
    return answers_map(*detect_answers(server, encoded), samples)


# ---- phases


def warm_up(args: argparse.Namespace, val: list[Sample], encoded: list[dict]) -> dict:
    """Train a server over HTTP (resuming `args.warm_dir` when it exists) until the served mAP@0.5 reaches
    args.warm_map or args.warm_minutes pass; its checkpoint directory is what both modes start from."""
    started = time.monotonic()
    weights = warm_weights(args)
    with start_server("warm", args.warm_dir / "checkpoints", args.threads, SSD_PUBLISH="every_step",
                      SSD_HOLDOUT_FRACTION="0", **weights) as server:
        version = httpx.get(f"{server.url}/model", timeout=30).json()["version"]
        stream = Stream(args.image_size, seed=100 + version)  # fresh images after a resumed warm-up
        measured = measure_map(server, val, encoded)
        print(f"warm-up from version {version}: mAP@0.5 {measured['map_50']:.3f}", flush=True)
        jobs = 0
        if weights and version == 0:  # one job, so that the modes' copies hold a checkpoint of these weights
            post_job(server, stream.take(args.warm_images), 1, None)
            jobs = 1
        while measured["map_50"] < args.warm_map and time.monotonic() - started < 60 * args.warm_minutes:
            post_job(server, stream.take(args.warm_images), args.warm_steps, args.warm_lr)
            jobs += 1
            if jobs % 3 == 0:
                measured = measure_map(server, val, encoded)
                print(f"warm-up job {jobs:3d} (+{jobs * args.warm_steps} steps, {time.monotonic() - started:5.0f} s): "
                      f"mAP@0.5 {measured['map_50']:.3f}", flush=True)
        measured = measure_map(server, val, encoded)
        print(f"warm-up done: version {measured['version']}, mAP@0.5 {measured['map_50']:.3f} {measured['per_class']}",
              flush=True)
        return measured


def warm_weights(args: argparse.Namespace) -> dict[str, str]:
    """SSD_WEIGHTS for every server of the run: the warm-up starts from them, and the modes (which resume its
    checkpoint) run as a deployment of trained weights does, without a fresh model's lr warm-up."""
    return {"SSD_WEIGHTS": args.warm_weights} if args.warm_weights else {}


JobMaker = Callable[[Stream], list[Sample]]


def schedule(args: argparse.Namespace) -> list[tuple[str, JobMaker]]:
    """(kind, make the job's samples) in order: (a) shifted boxes, (b) rotated labels (`--corrupt-jobs` each),
    (c) clean, (d) (a)+(b) again (unless `--repeat-corrupt 0`)."""
    def clean(stream: Stream) -> list[Sample]:
        return stream.take(args.job_images)

    def shifted(stream: Stream) -> list[Sample]:
        return [shift_boxes(s) for s in stream.take(args.job_images)]

    def rotated(stream: Stream) -> list[Sample]:
        return [rotate_labels(s) for s in stream.take(args.job_images)]

    corrupt = [("boxes", shifted)] * args.corrupt_jobs + [("labels", rotated)] * args.corrupt_jobs
    return [*corrupt, *[("clean", clean)] * args.clean_jobs, *corrupt * args.repeat_corrupt]


def job_row(kind: str, job: dict) -> dict:
    """What a job view says about the job: final state, training and evaluation seconds, gate and screening."""
    evaluation = job.get("evaluation") or {}
    screening = job.get("screening") or {}
    total = (job["finished_at"] or 0) - (job["started_at"] or 0)
    evaluating = evaluation.get("seconds", 0.0)
    return {
        "kind": kind, "status": job["status"], "decision": evaluation.get("decision"),
        "seconds_total": total, "seconds_evaluating": evaluating, "seconds_training": total - evaluating,
        "screen_loss": screening.get("loss"), "screen_median": screening.get("median"),
        "served_map": (evaluation.get("served") or {}).get("map_50"),
        "candidate_map": (evaluation.get("candidate") or {}).get("map_50"),
        "delta": evaluation.get("delta"), "margin": evaluation.get("margin"), "noise": evaluation.get("noise"),
        "error": job.get("error"),
        "held_out": job.get("held_out", 0),
    }


def run(args: argparse.Namespace) -> dict:
    val, encoded = held_out_images(args.eval_images, seed=1, image_size=args.image_size)
    warmed = warm_up(args, val, encoded)
    work = args.warm_dir.parent / "modes"
    shutil.rmtree(work, ignore_errors=True)
    validation = ShapesDataset(args.validation_images, image_size=args.image_size, seed=2, split="validation")
    validation_samples = [validation[i] for i in range(args.validation_images)]
    history: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "warm_up": warmed, "modes": {}}
    with contextlib.ExitStack() as stack:
        servers = []
        for mode in ("every_step", "gated"):
            shutil.copytree(args.warm_dir / "checkpoints", work / mode / "checkpoints")
            # no holdout by default: the 200 POSTed images stay the validation set, the served figures cached
            servers.append(stack.enter_context(start_server(mode, work / mode / "checkpoints", args.threads,
                                                            SSD_PUBLISH=mode, SSD_HOLDOUT_FRACTION=str(args.holdout),
                                                            **warm_weights(args))))
        for server in servers:
            added = post_validation(server, validation_samples)
            start = measure_map(server, val, encoded)
            history["modes"][server.name] = {"validation": added, "start": start, "jobs": []}
            print(f"{server.name}: validation set {added['images']} images; start mAP@0.5 {start['map_50']:.3f} "
                  f"{start['per_class']}", flush=True)
        streams = {server.name: Stream(args.image_size, seed=0) for server in servers}  # the same images in both
        print(f"{'job':>4} {'kind':>6} | " + " | ".join(
            f"{s.name:>10} mAP   state     train_s eval_s" for s in servers), flush=True)
        for number, (kind, make) in enumerate(schedule(args), 1):
            cells = []
            for server in servers:
                job = post_job(server, make(streams[server.name]), args.job_steps, args.lr)
                row = job_row(kind, job) | measure_map(server, val, encoded)
                history["modes"][server.name]["jobs"].append(row)
                cells.append(f"{row['map_50']:17.3f} {row['status']:>9} {row['seconds_training']:7.2f} "
                             f"{row['seconds_evaluating']:6.2f}")
            print(f"{number:4d} {kind:>6} | " + " | ".join(cells), flush=True)
            (args.out / "history.json").write_text(json.dumps(history, indent=1))
    return history


def summarise(history: dict, args: argparse.Namespace) -> None:
    modes = history["modes"]
    jobs = range(len(modes["gated"]["jobs"]) + 1)
    series = {f"{name} (served mAP@0.5)": [m["start"]["map_50"]] + [j["map_50"] for j in m["jobs"]]
              for name, m in modes.items()}
    plot = save_curves(args.out / "served_map.png", list(jobs), series,
                       title="Served mAP@0.5 over jobs (0 = after warm-up)", ylabel="mAP@0.5 (held-out val)", xlabel="job")
    print(f"plot: {plot}")
    for name, mode in modes.items():
        rows, start = mode["jobs"], mode["start"]["map_50"]
        print(f"\n{name}: start {start:.3f}, end {rows[-1]['map_50']:.3f}, "
              f"end per class {rows[-1]['per_class']}")
        k, clean_end = args.corrupt_jobs, 2 * args.corrupt_jobs + args.clean_jobs
        phases = {"(a) boxes": rows[:k], "(b) labels": rows[k : 2 * k], "(c) clean": rows[2 * k : clean_end],
                  "(d) again": rows[clean_end:]}
        before = start
        for phase, part in phases.items():
            if not part:
                continue
            lowest = min(r["map_50"] for r in part)
            rejected = sum(r["status"] == "rejected" for r in part)
            print(f"  {phase:10s}: {len(part):3d} jobs, rejected {rejected:3d}, served mAP@0.5 {before:.3f} -> "
                  f"{part[-1]['map_50']:.3f} (lowest {lowest:.3f}, drop {before - lowest:+.3f})")
            before = part[-1]["map_50"]
        evaluating = [r["seconds_evaluating"] for r in rows if r["decision"] in ("published", "rejected")]
        training = [r["seconds_training"] for r in rows if r["decision"] in ("published", "rejected")]
        if evaluating:
            ratios = [e / max(t, 1e-9) for e, t in zip(evaluating, training, strict=True)]
            print(f"  evaluation seconds per job: median {statistics.median(evaluating):.2f} "
                  f"(min {min(evaluating):.2f}); training median {statistics.median(training):.2f}; "
                  f"eval/train median {statistics.median(ratios):.2f}")
        screened = [(r["kind"], r["screen_loss"] / r["screen_median"]) for r in rows
                    if r["screen_loss"] is not None and r["screen_median"]]
        if screened:
            clean = [ratio for kind, ratio in screened if kind == "clean"]
            corrupt = {kind: [round(ratio, 2) for k, ratio in screened if k == kind] for kind in ("boxes", "labels")}
            print(f"  screening loss / median: clean max {max(clean, default=float('nan')):.2f} "
                  f"(n={len(clean)}), boxes {corrupt['boxes']}, labels {corrupt['labels']}")
        deltas = [r["candidate_map"] - r["served_map"] for r in rows if r["kind"] == "clean" and r["candidate_map"]
                  is not None]
        if deltas:
            margins = [r["margin"] for r in rows if r["kind"] == "clean" and r["margin"] is not None]
            print(f"  clean jobs' gate delta (candidate - served): min {min(deltas):+.4f}, median "
                  f"{statistics.median(deltas):+.4f}; margins {min(margins):.4f}..{max(margins):.4f}")
    gated, every = modes["gated"]["jobs"], modes["every_step"]["jobs"]
    start = modes["gated"]["start"]["map_50"]
    corrupt_low = min((r["map_50"] for r in gated if r["kind"] != "clean"), default=None)
    clean_rejected = sum(r["status"] == "rejected" for r in gated if r["kind"] == "clean")
    if corrupt_low is not None:
        print(f"\ngoal: with the gate, corruptions lower the served mAP@0.5 by <= {GOAL_MAP_DROP}: drop "
              f"{start - corrupt_low:+.3f} -> {'MET' if start - corrupt_low <= GOAL_MAP_DROP else 'MISSED'} "
              f"(every_step: lowest {min(r['map_50'] for r in every):.3f} from "
              f"{modes['every_step']['start']['map_50']:.3f})")
    print(f"goal: no clean job rejected: {clean_rejected} rejected -> {'MET' if clean_rejected == 0 else 'MISSED'}")


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    print(f"bench_online {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load average "
          f"{os.getloadavg()}", flush=True)
    history = run(args)
    summarise(history, args)
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
