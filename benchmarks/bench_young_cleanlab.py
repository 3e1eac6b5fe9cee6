"""cleanlab's object-detection label-issue finder on bench_young's corrupted batches: the reference its
quarantine is compared with. Run with a SEPARATE Python that has cleanlab (AGPL-3.0: never installed
into this service's environment), e.g.

    python3 -m venv /tmp/cleanlab-venv && /tmp/cleanlab-venv/bin/pip install cleanlab
    /tmp/cleanlab-venv/bin/python benchmarks/bench_young_cleanlab.py /tmp/bench_young

Reads `young_cleanlab.jsonl` (per corrupted job: the labels sent and the served model's detections on the
same images, asked for just before the job) and writes `young_cleanlab_scores.json`: per scenario and per
share over all corruptions whose jobs the service screened (`all@0.1 <mode>`: jobs it refused at the door,
as `young_jobs.jsonl` says, are left out, as they are from its own totals), the images cleanlab flags (`find_label_issues`) against
those whose annotation the corruption actually changed (`changed`; older rows: those it was applied to).
Imports nothing of the project.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from cleanlab.object_detection.filter import find_label_issues

NUM_CLASSES = 3


def _predictions(detections: list[dict]) -> list[np.ndarray]:
    """One image's detections as cleanlab wants them: per class, an [M, 5] array of x1, y1, x2, y2, score."""
    per_class = [[] for _ in range(NUM_CLASSES)]
    for d in detections:
        per_class[d["label"]].append([*d["box"], d["score"]])
    return [np.array(rows, dtype=np.float32).reshape(-1, 5) for rows in per_class]


def _groups(job: dict, refused: set[tuple]) -> list[str]:
    """The groups a job counts in: its scenario, and all corruptions at its share unless it was refused."""
    groups = [f"{job['scenario']} {job['mode']}"]
    if (job["scenario"], job["mode"], job["job"]) not in refused:
        groups.append(f"all@{job['scenario'].split('@')[1]} {job['mode']}")
    return groups


def main(work: Path) -> None:
    jobs = [json.loads(line) for line in (work / "young_cleanlab.jsonl").read_text().splitlines()]
    outcomes = [json.loads(line) for line in (work / "young_jobs.jsonl").read_text().splitlines()]
    refused = {(r["scenario"], r["mode"], r["job"]) for r in outcomes if r["status"].startswith("refused")}
    scores: dict[str, dict] = {}
    for scenario in dict.fromkeys(group for job in jobs for group in _groups(job, refused)):
        mine = [job for job in jobs if scenario in _groups(job, refused)]
        labels, predictions, truth = [], [], []
        for job in mine:
            for i, (boxes, classes, detections) in enumerate(zip(job["boxes"], job["labels"], job["detections"],
                                                                  strict=True)):
                labels.append({"bboxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
                               "labels": np.array(classes, dtype=np.int64)})
                predictions.append(_predictions(detections))
                truth.append(i in job.get("changed", job["corrupted"]))
        flagged = find_label_issues(labels, predictions)
        hits = int(np.sum(flagged & np.array(truth)))
        recall = hits / max(1, sum(truth))
        precision = hits / max(1, int(flagged.sum()))
        scores[scenario] = {"recall": f"{recall:.2f} ({hits}/{sum(truth)})",
                            "precision": f"{precision:.2f} ({hits}/{int(flagged.sum())})"}
        print(scenario, scores[scenario], flush=True)
    (work / "young_cleanlab_scores.json").write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
