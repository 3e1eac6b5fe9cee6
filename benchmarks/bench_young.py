"""A young deployment protected from its first jobs, over HTTP (not a timed test).

Live servers (`python -m app`, `ssd-small`, 4 classes, CPU, every setting at its default unless a mode
says otherwise), HTTP only, `ShapesDataset` scenes at `--image-size` px (1-3 objects of 0.2-0.6 of the side, `SCENES`):

1. warm-up: ONE server from an EMPTY checkpoint directory gets clean jobs of `--job-images` images x
   `--job-steps` steps, `--warm-lr` sent (a young deployment that learns fast: at the default rate a fresh
   ssd-small is still at mAP@0.5 0.035 after 10 such jobs), at least `--warm-jobs` of them and more until
   the served mAP@0.5 reaches `--warm-map` (at most `--warm-jobs-max`); its checkpoint directory is what
   every scenario starts from (a copy: every scenario's server is fresh and warmed the same way);
2. per scenario (a corruption of `ssd_core.online.corruptions` at a share of each job's images) and mode
   (`protected_0.2`: the defaults; `protected`: the defaults but screening from validation mAP@0.5 0.3;
   `unprotected`: SSD_PUBLISH=every_step, no screening or gate): `--bad-jobs`
   corrupted jobs, then `--after-jobs` clean ones, no learning_rate sent;
3. after every job: the served mAP@0.5 overall and per class from `POST /detect` on `--eval-images` held-out
   `split="val"` images (torchmetrics), the job's state, reason, quarantined images (true and false
   positives against the images actually corrupted), screening, evaluation and training seconds.

`--competent`: the same scenarios from a *competent* deployment instead, where the per-box label checks run
(validation mAP@0.5 >= 0.7 on >= 8 images): a server from the shipped demo model (`SSD_WEIGHTS=demo`: ssd-small
trained on `ShapesDataset`, held-out mAP@0.5 0.99) in its own fresh checkpoint directory, every other setting at
its default, on the demo's own scenes (`ShapesDataset` defaults, `--competent-image-size` 256 px), warmed by clean
jobs (no learning_rate sent) until its validation set holds `--competent-validation` images; mode `competent`
(the defaults), scenarios at `--shares` 0.1,0.5 by default; its rows go to `--work` (default
`/tmp/bench_young_competent`) and its tables to the "Competent deployment" block of `young.md` (the young
deployment's tables around it are kept).

The served model's detections on each corrupted job's images (asked for just before the job) and the job's
labels go to `young_cleanlab.jsonl`; `benchmarks/bench_young_cleanlab.py`, run with a separate Python that
has cleanlab (AGPL-3.0: never a dependency of this service), scores the same batches for comparison.

Writes `--work/young_jobs.jsonl` (one row per job) and, with `--report`, prints the tables, writes them to
`benchmarks/results/young.md` and draws `benchmarks/results/young_map.png`.
Run: `nice -n 10 python benchmarks/bench_young.py` then `python benchmarks/bench_young.py --report` (add
`--competent` to both for the competent deployment).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_online import REPO, Server, Stream, detect_answers, items, job_row, measure_map, start_server

from ssd_core.data.synthetic import CLASS_NAMES, ShapesDataset
from ssd_core.evaluation.plotting import save_curves
from ssd_core.online.corruptions import corrupt_job, corruptions

# protected: screening from validation mAP@0.5 0.3 (the default when the first runs were made); protected_0.2: from
# 0.2, the default now (the warm-up ends near 0.3, where a 0.3 rule is still quiet on most jobs)
MODES = {"protected": {"SSD_SCREEN_MIN_MAP": "0.3"}, "unprotected": {"SSD_PUBLISH": "every_step"},
         "protected_0.2": {"SSD_SCREEN_MIN_MAP": "0.2"}, "competent": {"SSD_WEIGHTS": "demo"}}
PROTECTED = ("protected", "protected_0.2", "competent")
SCENES = {"max_objects": 3, "min_size": 0.2, "max_size": 0.6}
COMPETENT_BLOCK = ("<!-- bench_young --competent: begin -->", "<!-- bench_young --competent: end -->")
GOAL_DROP = 0.02
GOAL_CLEAN_QUARANTINED = 0.01
GOAL_RECALL, GOAL_PRECISION = 0.9, 0.8


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--job-images", type=int, default=16)
    parser.add_argument("--job-steps", type=int, default=4)
    parser.add_argument("--warm-jobs", type=int, default=10)
    parser.add_argument("--warm-jobs-max", type=int, default=20)
    parser.add_argument("--warm-map", type=float, default=0.6)
    parser.add_argument("--warm-lr", type=float, default=5e-3)
    parser.add_argument("--bad-jobs", type=int, default=3)
    parser.add_argument("--after-jobs", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1, help="SSD_TORCH_THREADS of each server")
    parser.add_argument("--corruptions", default=",".join(corruptions(len(CLASS_NAMES))))
    parser.add_argument("--shares", default=None, help="shares of each bad job's images corrupted "
                        "(default 1.0,0.1; with --competent 0.1,0.5)")
    parser.add_argument("--modes", default="protected,unprotected")
    parser.add_argument("--competent", action="store_true",
                        help="from the demo model (SSD_WEIGHTS=demo) instead of a fresh one: mode `competent`")
    parser.add_argument("--competent-image-size", type=int, default=256)
    parser.add_argument("--competent-validation", type=int, default=12,
                        help="clean warm-up jobs until the validation set holds this many images")
    parser.add_argument("--work", type=Path, default=None,
                        help="default /tmp/bench_young (with --competent: /tmp/bench_young_competent)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--reuse-warm", action="store_true",
                        help="start the scenarios from --work's existing warm-up and add to its rows")
    parser.add_argument("--report", action="store_true", help="print and write the tables of --work, draw the plot")
    args = parser.parse_args(argv)
    if args.work is None:
        args.work = Path("/tmp/bench_young_competent" if args.competent else "/tmp/bench_young")
    if args.shares is None:
        args.shares = "0.1,0.5" if args.competent else "1.0,0.1"
    if args.competent:
        args.modes, args.image_size = "competent", args.competent_image_size
    return args


class Scenes(Stream):
    """Fresh images, never repeated: `SCENES`, or `ShapesDataset`'s defaults (the demo model's) when `competent`."""

    def __init__(self, image_size: int, seed: int, split: str = "train", competent: bool = False) -> None:
        scenes = {} if competent else SCENES
        self.dataset = ShapesDataset(1_000_000, image_size=image_size, seed=seed, split=split, **scenes)
        self.position = 0


def post(server: Server, samples: list, steps: int, lr: float | None = None) -> dict:
    """One job, waited for: its view, or a refusal's status and error (a 422 names the bad field)."""
    body = {"images": items(samples), "steps": steps} | ({} if lr is None else {"learning_rate": lr})
    response = httpx.post(f"{server.url}/finetune", params={"wait": "true"}, json=body, timeout=1800)
    if response.status_code != 200:
        return {"refused": response.status_code, "error": response.json().get("error", {}).get("message")}
    return response.json()


def record(args: argparse.Namespace, row: dict) -> None:
    with (args.work / "young_jobs.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def job_record(scenario: str, mode: str, number: int, kind: str, view: dict, corrupted: list[int],
               measured: dict, changed: list[int] | None = None) -> dict:
    """One row: the job's outcome, its quarantine against the truth, seconds, and the served mAP after it.
    corrupted: the images the corruption was applied to; changed: those whose annotation it actually changed
    (swapping two classes leaves an image of the third alone, dropping every other object a one-object image)."""
    changed = corrupted if changed is None else changed
    if "refused" in view:
        return {"scenario": scenario, "mode": mode, "job": number, "kind": kind, "status": f"refused {view['refused']}",
                "error": view["error"], "corrupted": corrupted, "changed": changed, "quarantined": [], **measured}
    screening = view.get("screening") or {}
    quarantined = [image["image"] for image in screening.get("images", []) if image["quarantined"]]
    row = job_row(kind, view)
    screening_seconds = screening.get("seconds") or 0.0
    return {"scenario": scenario, "mode": mode, "job": number, **row, "corrupted": corrupted, "changed": changed,
            "quarantined": quarantined,
            "images": view["num_images"], "losses_checked": screening.get("losses_checked"),
            "labels_checked": screening.get("labels_checked"), "seconds_screening": screening_seconds,
            "seconds_training": row["seconds_training"] - screening_seconds,
            "validation_images": (view.get("evaluation") or {}).get("validation_images"),
            "issues": [issue["issue"] for image in screening.get("images", []) for issue in image["issues"]],
            "false_quarantines": [{"image": image["image"], "issues": [issue["issue"] for issue in image["issues"]]}
                                  for image in screening.get("images", [])
                                  if image["quarantined"] and image["image"] not in changed],
            "load": round(os.getloadavg()[0], 2), **measured}


def warm_up(args: argparse.Namespace, val: list, encoded: list) -> Path:
    """Young: until `--warm-jobs` and `--warm-map`, `--warm-lr` sent. Competent (the demo model): until the
    validation set holds `--competent-validation` images, nothing but the images sent."""
    directory = args.work / "warm" / "checkpoints"
    shutil.rmtree(directory.parent, ignore_errors=True)
    stream = Scenes(args.image_size, seed=0, competent=args.competent)
    mode = "competent" if args.competent else "protected"
    with start_server("warm", directory, args.threads, **(MODES[mode] if args.competent else {})) as server:
        record(args, {"scenario": "warm-up", "mode": mode, "job": 0, "kind": "start", "status": "-",
                      **measure_map(server, val, encoded)})
        served, validation = 0.0, 0
        for number in range(1, args.warm_jobs_max + 1):
            if args.competent and validation >= args.competent_validation:
                break
            if not args.competent and number > args.warm_jobs and served >= args.warm_map:
                break
            view = post(server, stream.take(args.job_images), args.job_steps, None if args.competent else args.warm_lr)
            row = job_record("warm-up", mode, number, "clean", view, [], measure_map(server, val, encoded))
            served, validation = row["map_50"], row.get("validation_images") or 0
            record(args, row)
            print(f"warm-up job {number:2d}: {row['status']:9s} mAP@0.5 {row['map_50']:.3f} quarantined "
                  f"{len(row['quarantined'])} validation {row.get('validation_images')}", flush=True)
    return directory


def run_scenario(args: argparse.Namespace, warm: Path, name: str, share: float, mode: str, val: list,
                 encoded: list) -> None:
    scenario = f"{name}@{share:g}"
    directory = args.work / "runs" / f"{scenario}-{mode}" / "checkpoints"
    shutil.rmtree(directory.parent, ignore_errors=True)
    shutil.copytree(warm, directory)
    corruption = corruptions(len(CLASS_NAMES))[name]
    stream = Scenes(args.image_size, seed=1000, competent=args.competent)  # the same images in every scenario and mode
    with start_server(f"{scenario}-{mode}", directory, args.threads, **MODES[mode]) as server:
        record(args, {"scenario": scenario, "mode": mode, "job": 0, "kind": "start", "status": "-",
                      **measure_map(server, val, encoded)})
        for number in range(1, args.bad_jobs + args.after_jobs + 1):
            bad = number <= args.bad_jobs
            clean = stream.take(args.job_images)
            samples, corrupted = corrupt_job(clean, corruption, share if bad else 0.0, number)
            changed = [i for i in corrupted if not _same_annotation(samples[i], clean[i])]
            if bad and mode in PROTECTED:
                with (args.work / "young_cleanlab.jsonl").open("a") as f:
                    f.write(json.dumps({"scenario": scenario, "mode": mode, "job": number, "corrupted": corrupted,
                                        "changed": changed,
                                        "boxes": [s.boxes.tolist() for s in samples],
                                        "labels": [s.labels.tolist() for s in samples],
                                        "detections": detect_answers(server, items(samples))[0]}) + "\n")
            view = post(server, samples, args.job_steps)
            row = job_record(scenario, mode, number, "bad" if bad else "clean", view, corrupted,
                             measure_map(server, val, encoded), changed)
            record(args, row)
            print(f"{scenario:22s} {mode:11s} job {number}: {row['status']:12s} mAP@0.5 {row['map_50']:.3f} "
                  f"quarantined {row['quarantined']} of corrupted {corrupted} "
                  f"{(row.get('error') or '')[:90]}", flush=True)


def _same_annotation(first, second) -> bool:
    return first.boxes.shape == second.boxes.shape and bool((first.boxes == second.boxes).all()) \
        and bool((first.labels == second.labels).all())


# ---- the report


def _rows(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "young_jobs.jsonl").read_text().splitlines()]


def _fraction(numerator: int, denominator: int) -> str:
    return "-" if denominator == 0 else f"{numerator / denominator:.2f} ({numerator}/{denominator})"


def report(args: argparse.Namespace) -> str:
    rows = _rows(args.work)
    lines = [f"bench_young: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load at report "
             f"{os.getloadavg()[0]:.1f}", ""]
    warm = [r for r in rows if r["scenario"] == "warm-up"]
    start_from = "the demo model, defaults" if args.competent else "fresh deployment, defaults"
    lines += [f"### Warm-up ({start_from}, clean jobs)", "",
              "| job | state | served mAP@0.5 | " + " | ".join(CLASS_NAMES) + " | validation images | quarantined |",
              "|---|---|---|" + "---|" * len(CLASS_NAMES) + "---|---|"]
    for r in warm:
        aps = " | ".join(f"{r['per_class'].get(c, -1):.3f}" for c in CLASS_NAMES)
        lines.append(f"| {r['job']} | {r['status']} | {r['map_50']:.3f} | {aps} | {r.get('validation_images') or '-'} | "
                     f"{len(r.get('quarantined', []))} |")
    start = warm[-1]["map_50"] if warm else float("nan")
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows if r["scenario"] != "warm-up"))
    lines += ["", f"### Corrupted jobs then clean ones (each scenario from the warm-up's checkpoint, mAP@0.5 {start:.3f})",
              "", "| scenario | mode | mAP@0.5 after each job | lowest | drop | end per class | states |",
              "|---|---|---|---|---|---|---|"]
    curves, drops = {}, {}
    for scenario in scenarios:
        for mode in MODES:
            mine = [r for r in rows if r["scenario"] == scenario and r["mode"] == mode]
            jobs = [r for r in mine if r["job"] > 0]
            if not jobs:
                continue
            before = mine[0]["map_50"]
            lowest = min(r["map_50"] for r in jobs)
            drops[(scenario, mode)] = before - lowest
            curves[f"{scenario} {mode}"] = [r["map_50"] for r in mine]
            per_class = ", ".join(f"{c} {jobs[-1]['per_class'].get(c, -1):.2f}" for c in CLASS_NAMES)
            lines.append(f"| {scenario} | {mode} | {before:.3f} -> " + " ".join(f"{r['map_50']:.3f}" for r in jobs)
                         + f" | {lowest:.3f} | {before - lowest:+.3f} | {per_class} | "
                         + ", ".join(r["status"] for r in jobs) + " |")
    lines += ["", "### Decisions and reasons (protected modes)", "",
              "| scenario | mode | job | kind | state | quarantined (corrupted) | reason |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] in PROTECTED and r["scenario"] != "warm-up" and r["job"] > 0:
            reason = (r.get("error") or "").replace("|", "/")[:160]
            lines.append(f"| {r['scenario']} | {r['mode']} | {r['job']} | {r['kind']} | {r['status']} | "
                         f"{r['quarantined']} ({_changed(r)}) | {reason} |")
    lines += ["", "### Quarantine against the images actually corrupted (protected, bad jobs the service accepted "
              "for screening; corrupted: annotation changed by the corruption)", "",
              "| scenario, mode | corrupted | quarantined | true positives | recall | precision | "
              "cleanlab recall | cleanlab precision |", "|---|---|---|---|---|---|---|---|"]
    cleanlab = {}
    scored = args.work / "young_cleanlab_scores.json"
    if scored.exists():
        cleanlab = json.loads(scored.read_text())
    totals: dict[tuple[str, str], list[int]] = {}
    for scenario, mode in ((s, m) for s in scenarios for m in PROTECTED):
        bad = [r for r in rows if r["scenario"] == scenario and r["mode"] == mode and r.get("kind") == "bad"
               and r.get("losses_checked") is not None]
        if not bad:
            continue
        truth = sum(len(_changed(r)) for r in bad)
        flagged = sum(len(r["quarantined"]) for r in bad)
        hits = sum(len(set(_changed(r)) & set(r["quarantined"])) for r in bad)
        total = totals.setdefault((scenario.split("@")[1], mode), [0, 0, 0])
        total[0], total[1], total[2] = total[0] + truth, total[1] + flagged, total[2] + hits
        theirs = cleanlab.get(f"{scenario} {mode}", {})
        lines.append(f"| {scenario} {mode} | {truth} | {flagged} | {hits} | {_fraction(hits, truth)} | {_fraction(hits, flagged)} | "
                     f"{theirs.get('recall', '-')} | {theirs.get('precision', '-')} |")
    for scenario, mode in ((s, m) for s in scenarios for m in PROTECTED):
        refused = [r for r in rows if r["scenario"] == scenario and r["mode"] == mode and r.get("kind") == "bad"
                   and r["status"].startswith("refused")]
        if refused:
            lines.append(f"| {scenario} {mode} | refused at the door ({refused[0]['status']}): {len(refused)} bad jobs, "
                         "nothing screened or trained | | | | | | |")
    for (share, mode), (truth, flagged, hits) in totals.items():
        theirs = cleanlab.get(f"all@{share} {mode}", {})
        lines.append(f"| **all@{share}** {mode} | {truth} | {flagged} | {hits} | **{_fraction(hits, truth)}** | "
                     f"**{_fraction(hits, flagged)}** | {theirs.get('recall', '-')} | {theirs.get('precision', '-')} |")
    lines += ["", "### Quarantined clean images (false positives) by issue", "", "| scenario | mode | job | image | issues |",
              "|---|---|---|---|---|"]
    for r in rows:
        for image in r.get("false_quarantines", []):
            lines.append(f"| {r['scenario']} | {r['mode']} | {r['job']} | {image['image']} | {', '.join(image['issues'])} |")
    lines += ["", "### Goals", "", "| goal | mode | result |", "|---|---|---|"]
    for mode in (m for m in PROTECTED if any(r["mode"] == m for r in rows)):
        lines += _goals(rows, mode, [d for (_, m), d in drops.items() if m == mode])
    if curves:
        length = max(len(c) for c in curves.values())
        padded = {name: c + [float("nan")] * (length - len(c)) for name, c in curves.items()}
        plot = args.out / ("young_competent_map.png" if args.competent else "young_map.png")
        deployment = "the demo model" if args.competent else "a young deployment"
        save_curves(plot, list(range(length)), padded,
                    title=f"Served mAP@0.5 from {deployment}: corrupted jobs (1-3), then clean ones",
                    ylabel="served mAP@0.5 (held-out val)", xlabel="job after the warm-up")
        lines += ["", f"plot: {plot}"]
    text = "\n".join(lines)
    _write(args.out / "young.md", text, args.competent)
    return text


def _write(path: Path, text: str, competent: bool) -> None:
    """The young deployment's tables replace the file up to the competent block, which is kept; the competent
    deployment's replace that block (appended at the end when absent), and the rest is kept."""
    old = path.read_text() if path.exists() else ""
    begin, end = COMPETENT_BLOCK
    has_block = begin in old and end in old
    if competent:
        block = f"{begin}\n## Competent deployment (`--competent`)\n\n{text}\n{end}"
        before, after = (old.split(begin)[0], old.split(end, 1)[1]) if has_block else (old.rstrip() + "\n\n", "\n")
        path.write_text(before + block + after)
    else:
        kept = old[old.index(begin):] if has_block else ""
        path.write_text(text + "\n" + ("\n" + kept if kept else ""))


def _changed(row: dict) -> list[int]:
    """The images whose annotation the corruption changed (rows from before `changed` was kept: those it hit)."""
    return row.get("changed", row["corrupted"])


def _goals(rows: list[dict], mode: str, drops: list[float]) -> list[str]:
    """The issue's goals for one protected mode: worst drop, clean jobs and images, evaluation cost."""
    clean_images = quarantined_clean = 0
    for r in rows:
        if r["mode"] == mode and r.get("images") and "quarantined" in r:
            clean = set(range(r["images"])) - set(_changed(r))
            clean_images += len(clean)
            quarantined_clean += len(clean & set(r["quarantined"]))
    clean_jobs = [r for r in rows if r["mode"] == mode and r.get("kind") == "clean"]
    rejected_clean = [r for r in clean_jobs if r["status"] == "rejected"]
    timed = [r for r in rows if r["mode"] == mode and r.get("decision") in ("published", "rejected")]
    ratios = [(r["seconds_evaluating"] + r["seconds_screening"]) / r["seconds_training"] for r in timed
              if r["seconds_training"] > 0]
    worst = max(drops, default=float("nan"))
    return [
        f"| no corruption lowers served mAP@0.5 by more than {GOAL_DROP} | {mode} | worst drop {worst:+.3f}: "
        f"{'met' if drops and worst <= GOAL_DROP else 'missed'} |",
        f"| clean jobs: none rejected | {mode} | {len(rejected_clean)} of {len(clean_jobs)} rejected: "
        f"{'met' if not rejected_clean else 'missed'} |",
        f"| clean images quarantined < 1% | {mode} | {_fraction(quarantined_clean, clean_images)}: "
        f"{'met' if clean_images and quarantined_clean / clean_images < GOAL_CLEAN_QUARANTINED else 'missed'} |",
        f"| evaluation + screening <= training time | {mode} | median ratio "
        f"{statistics.median(ratios) if ratios else float('nan'):.2f} over {len(ratios)} gated jobs "
        f"(max {max(ratios, default=float('nan')):.2f}) |",
    ]


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(args))
        return
    print(f"bench_young {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()}", flush=True)
    val = Scenes(args.image_size, seed=1, split="val").take(args.eval_images)
    encoded = items(val)
    if args.reuse_warm:
        warm = args.work / "warm" / "checkpoints"
    else:
        for name in ("young_jobs.jsonl", "young_cleanlab.jsonl"):
            (args.work / name).unlink(missing_ok=True)
        warm = warm_up(args, val, encoded)
    for share in (float(s) for s in args.shares.split(",")):
        for name in args.corruptions.split(","):
            for mode in args.modes.split(","):
                run_scenario(args, warm, name, share, mode, val, encoded)
    print(report(args))


if __name__ == "__main__":
    main()
