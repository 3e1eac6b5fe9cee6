"""Pre-annotations that improve as people label, through a real Label Studio (issue: Label Studio connects
unmodified; not a timed test).

A live server (`ssd-small`, CPU, an EMPTY checkpoint directory, the service's defaults unless `--set`
overrides them) is connected as the ML backend of a Label Studio 1.23 project (its own venv and a migrated
data directory: tests/integration/label_studio_live.py) holding `--train` `ShapesDataset(split="train")`
tasks and `--held-out` `split="val"` tasks. In rounds of `--round-images` the train tasks are annotated
through Label Studio's API with their correct boxes (the webhooks feed the annotation stream); after each
round, once the stream's jobs have finished, Label Studio's "Retrieve Predictions" runs on the held-out
tasks and the pre-annotations Label Studio then holds are scored:
- mAP@0.5 of the pre-annotations (their boxes and per-box scores) against the truth,
- the share of pre-annotated boxes an annotator would keep unchanged (same label, IoU >= 0.5 with a truth
  box not already kept),
- seconds from the round's last annotation to a new version being served (`GET /model`),
and, to tell the pre-annotation threshold apart from the learning, the served model's mAP@0.5 from
`POST /detect` at score_threshold 0.01 on the same images (as `bench_fresh.py` scores), with the stream
jobs' end states so far.
Meanwhile a thread posts no-op webhooks (`PROJECT_UPDATED`) and times their answers (the p99 must stay
under 200 ms while the trainer trains).

Goal: pre-annotation mAP@0.5 >= 0.6 after 160 annotated images and >= 0.8 after 320.
Run: `nice -n 10 python benchmarks/bench_label_studio.py --rounds 20 [--set SSD_STREAM_STEPS=8]`.
Rows go to `--out/label_studio.jsonl`; `--out/label_studio_map.png` plots both curves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ssd_core.data.images import encode_png  # noqa: E402
from ssd_core.data.synthetic import CLASS_NAMES, ShapesDataset  # noqa: E402
from ssd_core.evaluation.mean_ap import average_precision_50  # noqa: E402
from ssd_core.evaluation.plotting import save_curves  # noqa: E402
from ssd_core.models.postprocess import Detections  # noqa: E402
from ssd_core.ops.boxes import box_iou  # noqa: E402
from tests.integration.label_studio_live import LABEL_CONFIG, LEGACY_TOKEN, install, run_label_studio  # noqa: E402
from tests.integration.live import run_service  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_online import items, measure_map  # noqa: E402

GOALS = {160: 0.6, 320: 0.8}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--round-images", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the service")
    parser.add_argument("--set", action="append", default=[], help="SSD_KEY=VALUE for the service")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "label_studio")
    return parser.parse_args(argv)


def upload(api: httpx.Client, project: int, dataset: ShapesDataset, prefix: str) -> list[dict]:
    """Import the data set's images as tasks (in chunks); the tasks in data-set order."""
    for start in range(0, len(dataset), 32):
        files = [(f"file{k}", (f"{prefix}{k}.png", encode_png(dataset[k].image), "image/png"))
                 for k in range(start, min(start + 32, len(dataset)))]
        assert api.post(f"/api/projects/{project}/import", files=files).status_code == 201
    tasks, page = [], 1
    while True:
        batch = api.get("/api/tasks/", params={"project": project, "page": page, "page_size": 100}).json()["tasks"]
        tasks += batch
        if len(batch) < 100:
            break
        page += 1
    by_name = {task["data"]["image"].rsplit("-", 1)[-1]: task for task in tasks}
    return [by_name[f"{prefix}{k}.png"] for k in range(len(dataset)) if f"{prefix}{k}.png" in by_name]


def rectangles(sample) -> list[dict]:
    height, width = sample.image.shape[1:]
    return [{"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": width,
             "original_height": height, "value": {"x": 100 * x1 / width, "y": 100 * y1 / height,
             "width": 100 * (x2 - x1) / width, "height": 100 * (y2 - y1) / height, "rotation": 0,
             "rectanglelabels": [CLASS_NAMES[label]]}}
            for (x1, y1, x2, y2), label in zip(sample.boxes.tolist(), sample.labels.tolist(), strict=True)]


def pre_annotations(prediction: dict, sample) -> Detections:
    height, width = sample.image.shape[1:]
    boxes, labels, scores = [], [], []
    for item in prediction["result"]:
        v = item["value"]
        boxes.append([v["x"] * width / 100, v["y"] * height / 100, (v["x"] + v["width"]) * width / 100,
                      (v["y"] + v["height"]) * height / 100])
        labels.append(CLASS_NAMES.index(v["rectanglelabels"][0]))
        scores.append(item["score"])
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores),
                      torch.tensor(labels, dtype=torch.long))


def kept_share(found: list[Detections], samples: list) -> float:
    """Pre-annotated boxes an annotator keeps unchanged: same label, IoU >= 0.5 with a truth not yet kept."""
    kept = total = 0
    for detections, sample in zip(found, samples, strict=True):
        total += len(detections.boxes)
        if not len(detections.boxes) or not len(sample.boxes):
            continue
        iou = box_iou(detections.boxes, sample.boxes)
        free = torch.ones(len(sample.boxes), dtype=torch.bool)
        for k in torch.argsort(detections.scores, descending=True).tolist():
            match = (iou[k] >= 0.5) & free & (sample.labels == detections.labels[k])
            if match.any():
                free[torch.nonzero(match)[0, 0]] = False
                kept += 1
    return kept / total if total else 0.0


class WebhookProbe(threading.Thread):
    """Posts no-op webhooks every 0.2 s and keeps their answer times."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.seconds, self.stopping = url, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stopping.wait(0.2):
                started = time.perf_counter()
                client.post(f"{self.url}/labelstudio/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
                self.seconds.append(time.perf_counter() - started)


def run(args: argparse.Namespace) -> list[dict]:
    reason = install()
    if reason is not None:
        sys.exit(reason)
    train = ShapesDataset(args.rounds * args.round_images, image_size=args.image_size, seed=0, split="train")
    val = ShapesDataset(args.held_out, image_size=args.image_size, seed=0, split="val")
    val_items = items([val[k] for k in range(len(val))])
    work = Path(tempfile.mkdtemp(prefix="bench-label-studio-"))
    env = {"SSD_CLASS_NAMES": "shapes", "SSD_TORCH_THREADS": str(args.threads), **dict(s.split("=", 1) for s in args.set)}
    rows = []
    with run_label_studio(work / "ls") as ls, ls.api(timeout_s=600) as api:
        env |= {"SSD_LABEL_STUDIO_URL": ls.url, "SSD_LABEL_STUDIO_API_KEY": LEGACY_TOKEN}
        batch = int(env.get("SSD_STREAM_BATCH_IMAGES", "8"))
        with run_service(work / "service", **env) as service:
            project = api.post("/api/projects", json={"title": "bench", "label_config": LABEL_CONFIG}).json()["id"]
            train_tasks, val_tasks = upload(api, project, train, "t"), upload(api, project, val, "v")
            backend = api.post("/api/ml", json={"project": project, "url": f"{service.url}/labelstudio",
                                                 "title": "ssd-service"}).json()
            assert backend["state"] == "CO", backend
            probe = WebhookProbe(service.url)
            probe.start()
            for round_ in range(args.rounds + 1):
                version = httpx.get(f"{service.url}/model").json()["version"]
                published_s = None
                if round_:
                    chosen = range((round_ - 1) * args.round_images, round_ * args.round_images)
                    for k in chosen:
                        api.post(f"/api/tasks/{train_tasks[k]['id']}/annotations/",
                                 json={"result": rectangles(train[k]), "was_cancelled": False})
                    last = time.monotonic()
                    while True:  # the round's jobs finished (or the gate kept the old version)
                        jobs = httpx.get(f"{service.url}/finetune", params={"source": "label-studio", "limit": 100}).json()
                        pending = [j for j in jobs["jobs"] if j["status"] in ("queued", "running")]
                        served = httpx.get(f"{service.url}/model").json()["version"]
                        if published_s is None and served != version:
                            published_s = time.monotonic() - last
                        if not pending and jobs["total"] >= round_ * args.round_images // batch:
                            break
                        time.sleep(0.5)
                ids = [task["id"] for task in val_tasks]
                api.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                         json={"selectedItems": {"all": False, "included": ids}})
                found = []
                for task, k in zip(val_tasks, range(len(val)), strict=True):
                    predictions = api.get("/api/predictions/", params={"task": task["id"]}).json()
                    newest = max(predictions, key=lambda p: p["id"])
                    found.append(pre_annotations(newest, val[k]))
                samples = [val[k] for k in range(len(val))]
                map_50, _ = average_precision_50(found, samples)
                states = [j["status"] for j in httpx.get(f"{service.url}/finetune",
                                                         params={"source": "label-studio", "limit": 100}).json()["jobs"]]
                row = {"annotated": round_ * args.round_images, "map_50": round(map_50, 4),
                       "kept_share": round(kept_share(found, samples), 4), "version": newest["model_version"],
                       "detect_map_50": round(measure_map(service, samples, val_items)["map_50"], 4),
                       "jobs": {state: states.count(state) for state in sorted(set(states))},
                       "seconds_to_new_version": None if published_s is None else round(published_s, 1),
                       "webhook_p99_ms": round(1000 * statistics.quantiles(probe.seconds, n=100)[98], 1)
                       if len(probe.seconds) >= 100 else None, "load": os.getloadavg()[0]}
                rows.append(row)
                print(json.dumps(row), flush=True)
            probe.stopping.set()
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    with (args.out / "label_studio.jsonl").open("a") as out:
        for row in rows:
            out.write(json.dumps({**row, "settings": args.set}) + "\n")
    save_curves(args.out / "label_studio_map.png", [r["annotated"] for r in rows],
                {"pre-annotation mAP@0.5": [r["map_50"] for r in rows],
                 "boxes kept unchanged": [r["kept_share"] for r in rows]},
                title="Label Studio pre-annotations on held-out tasks", ylabel="ratio", xlabel="annotated images")
    for images, goal in GOALS.items():
        reached = [r["map_50"] for r in rows if r["annotated"] == images]
        if reached:
            print(f"after {images} images: mAP@0.5 {reached[0]:.3f} (goal {goal})")


if __name__ == "__main__":
    main()
