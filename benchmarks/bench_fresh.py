"""Learning from a fresh model over HTTP with the service's own recipe (issue 11, point 4; not a timed test).

Extends `bench_online.py` (its server harness, job items and `POST /detect` mAP are reused): a live
server (`python -m app`, `ssd-small`, CPU) starts from an EMPTY checkpoint directory with the
service's defaults (gated publishing, holdout 0.1, the online recipe) unless a variant overrides them
(`--variant NAME:KEY=VALUE,KEY=VALUE`), and gets only clean `POST /finetune` jobs of `--job-images`
`ShapesDataset(split="train")` images x `--job-steps` steps, no `learning_rate` sent. Held-out
mAP@0.5 overall and per class from `POST /detect` on `--eval-images` `split="val"` images at the
`--eval-at` job counts. Every job's state, gate decision, validation-set size, screening loss and its
evaluating and other seconds go to `--out/fresh_jobs.jsonl`, every measurement to `fresh.jsonl`;
`--report` prints the tables and draws `--out/fresh_map.png`.

Goal (issue 11): mAP@0.5 >= 0.6 after 100 jobs and >= 0.8 after 300, no collapse at any point.
Run: `nice -n 10 python benchmarks/bench_fresh.py --jobs 300 [--variant every_step:SSD_PUBLISH=every_step]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_online import (
    Stream,
    add_report_arguments,
    begin_run,
    job_row,
    measure_map,
    post_job,
    start_server,
)

from ssd_core.data.synthetic import CLASS_NAMES
from ssd_core.evaluation.plotting import save_curves

GOALS = {100: 0.6, 300: 0.8}  # jobs: held-out mAP@0.5 reached
COLLAPSE = 0.5  # a measurement below this fraction of the best one before it is a collapse


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`NAME` or `NAME:KEY=VALUE,KEY=VALUE` -> (name, {SSD_* setting: value})."""
    name, _, settings = text.partition(":")
    return name, dict(pair.split("=", 1) for pair in settings.split(",") if pair)


def run_variant(name: str, env: dict[str, str], args: argparse.Namespace, val: list, encoded: list[dict]) -> None:
    directory = args.work / name / "checkpoints"
    shutil.rmtree(directory.parent, ignore_errors=True)
    stream = Stream(256, seed=0)  # the same job images for every variant
    eval_at = {int(n) for n in args.eval_at.split(",")} | {0, args.jobs}
    started = time.monotonic()
    with start_server(name, directory, args.threads, **env) as server:
        for job in range(args.jobs + 1):
            if job:
                view = post_job(server, stream.take(args.job_images), args.job_steps, None)
                row = {"variant": name, "job": job, **job_row("clean", view),
                       "validation_images": (view.get("evaluation") or {}).get("validation_images"),
                       "replayed": (view.get("replay") or {}).get("images", 0), "load": round(os.getloadavg()[0], 2)}
                with (args.out / "fresh_jobs.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
            if job not in eval_at:
                continue
            measured = measure_map(server, val, encoded)
            row = {"variant": name, "job": job, "settings": env, **measured,
                   "seconds": round(time.monotonic() - started, 1), "load": round(os.getloadavg()[0], 2),
                   "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
            print(json.dumps(row), flush=True)
            with (args.out / "fresh.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "fresh.jsonl").read_text().splitlines()]
    jobs = [json.loads(line) for line in (out / "fresh_jobs.jsonl").read_text().splitlines()]
    by_variant: dict[str, list[dict]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    print("| variant | jobs | mAP@0.5 | " + " | ".join(f"{c} AP" for c in CLASS_NAMES) + " | minutes | load |")
    print("|---|---|---|" + "---|" * len(CLASS_NAMES) + "---|---|")
    for name, series in by_variant.items():
        for row in series:
            aps = " | ".join(f"{row['per_class'].get(c, -1):.3f}" for c in CLASS_NAMES)
            print(f"| {name} | {row['job']} | {row['map_50']:.3f} | {aps} | {row['seconds'] / 60:.1f} | {row['load']} |")
    print("\n| variant | goal | result |\n|---|---|---|")
    for name, series in by_variant.items():
        reached = {row["job"]: row["map_50"] for row in series}
        for count, goal in GOALS.items():
            got = reached.get(count)
            verdict = "not run" if got is None else f"{got:.3f}: {'met' if got >= goal else 'missed'}"
            print(f"| {name} | mAP@0.5 >= {goal} after {count} jobs | {verdict} |")
        best, collapses = 0.0, []
        for row in series:
            if best > 0.1 and row["map_50"] < COLLAPSE * best:
                collapses.append(row["job"])
            best = max(best, row["map_50"])
        print(f"| {name} | no collapse (a measurement under {COLLAPSE} x the best before it) | "
              f"{'none' if not collapses else 'at jobs ' + ', '.join(map(str, collapses))} |")
    print("\n| variant | jobs | succeeded | rejected (gate) | rejected (screening) | ungated | "
          "evaluation s (median) | other s (median) | ratio at >= 150 validation images (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in by_variant:
        mine = [j for j in jobs if j["variant"] == name]
        rejected = [j for j in mine if j["status"] == "rejected"]
        by_screen = [j for j in rejected if j["decision"] is None]
        full = [j["seconds_evaluating"] / j["seconds_training"] for j in mine
                if (j["validation_images"] or 0) >= 150 and j["seconds_training"] > 0 and j["seconds_evaluating"]]
        print(f"| {name} | {len(mine)} | {sum(j['status'] == 'succeeded' for j in mine)} | "
              f"{len(rejected) - len(by_screen)} | {len(by_screen)} | {sum(j['decision'] == 'ungated' for j in mine)} | "
              f"{_median([j['seconds_evaluating'] for j in mine if j['seconds_evaluating']]):.2f} | "
              f"{_median([j['seconds_training'] for j in mine]):.2f} | {_median(full):.2f} (n={len(full)}) |")
    counts = sorted({row["job"] for row in rows})
    curves = {f"{name}: mAP@0.5": [next((r["map_50"] for r in series if r["job"] == n), float("nan")) for n in counts]
              for name, series in by_variant.items()}
    save_curves(out / "fresh_map.png", counts, curves, title="Held-out mAP@0.5 learning from fresh over /finetune",
                ylabel="mAP@0.5 (held-out val)", xlabel="job (8 images x 4 steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME[:SSD_KEY=VALUE,...] (repeatable; default: one variant 'defaults')")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_fresh"))
    parser.add_argument("--eval-at", default="25,50,100,150,200,250,300")
    add_report_arguments(parser, jobs=300, eval_images=96, threads=2)
    args = parser.parse_args()
    held_out = begin_run("bench_fresh", args, report)
    if held_out is None:
        return
    val, encoded = held_out
    for text in args.variant or ["defaults"]:
        run_variant(*parse_variant(text), args, val, encoded)


if __name__ == "__main__":
    main()
