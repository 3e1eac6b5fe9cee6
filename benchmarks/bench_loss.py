"""Time MultiBoxLoss against the seed's per-image algorithm and torchvision's SSD loss.

Forward + backward on the same random inputs (VOC300 priors, P = 8732), interleaved repeats, medians
and minima (the least disturbed run on a shared machine);
then the no-grad scoring path (`criterion.compute` under `torch.no_grad()`, the service's /score-loss).
With `--baseline REV` the `MultiBoxLoss` of git revision REV (its whole `ssd_core`, imported as another
package) is timed in the same interleaved loop, so that before/after share every load fluctuation.
Prints a markdown table with ratios.
Usage: python benchmarks/bench_loss.py [--quick] [--repeats N] [--threads N] [--baseline REV]
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssd_core import VOC_300, MultiBoxLoss, point_form, prior_boxes  # noqa: E402
from tests.ssd_core.loss.ssd_pytorch_reference import ssd_pytorch_multibox_loss  # noqa: E402
from tests.ssd_core.random_data import random_predictions, random_targets  # noqa: E402

CPU = torch.device("cpu")


def torchvision_ssd(num_classes: int) -> SSD:
    """An SSD whose only used parts are `proposal_matcher` and `compute_loss` (the network is a stub)."""
    anchors = DefaultBoxGenerator([[2]])
    return SSD(nn.Identity(), anchors, (300, 300), num_classes, head=nn.Identity(), iou_thresh=0.5)


def torchvision_loss(model: SSD, loc, conf, anchors_xyxy, targets):
    """torchvision's training path from SSD.forward: per-image Matcher, then compute_loss."""
    tv_targets, matched_idxs = [], []
    for t in targets:
        boxes, labels = t[:, :4], t[:, 4].long() + 1  # torchvision's labels count background as 0
        tv_targets.append({"boxes": boxes, "labels": labels})
        if len(boxes) == 0:
            matched_idxs.append(torch.full((len(anchors_xyxy),), -1, dtype=torch.int64))
        else:
            matched_idxs.append(model.proposal_matcher(box_iou(boxes, anchors_xyxy)))
    head = {"bbox_regression": loc, "cls_logits": conf}
    losses = model.compute_loss(tv_targets, head, [anchors_xyxy] * len(targets), matched_idxs)
    return losses["bbox_regression"], losses["classification"]


def baseline_ssd_core(revision: str, directory: Path):
    """The `ssd_core` of `revision`, extracted into `directory` and imported as package `ssd_core_baseline`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "ssd_core"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    package = directory / "ssd_core_baseline"
    (directory / "ssd_core").rename(package)
    for source in package.rglob("*.py"):
        text = source.read_text().replace("from ssd_core.", "from ssd_core_baseline.")
        source.write_text(text.replace("from ssd_core import", "from ssd_core_baseline import"))
    sys.path.insert(0, str(directory))
    return importlib.import_module("ssd_core_baseline")


def time_once(fn, loc, conf, backward: bool) -> float:
    loc.grad = conf.grad = None
    start = time.perf_counter()
    loss_l, loss_c = fn()
    if backward:
        (loss_l + loss_c).backward()
    if loc.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_case(
    batch: int, num_classes: int, repeats: int, priors, baseline: type | None, device: torch.device = CPU
) -> dict[str, float]:
    generator = torch.Generator().manual_seed(batch * 1000 + num_classes)
    targets = [t.to(device) for t in random_targets(batch, 8, num_classes, generator, allow_empty=False)]
    loc, conf = (t.detach().to(device).requires_grad_() for t in random_predictions(batch, len(priors), num_classes,
                                                                                     generator))
    priors = priors.to(device)
    ours = MultiBoxLoss.ssd_pytorch(num_classes)
    tv_model, anchors_xyxy = torchvision_ssd(num_classes), point_form(priors)

    def compute_no_grad():
        with torch.no_grad():
            output = ours.compute((loc, conf, priors), targets)
        return output.loss_l, output.loss_c

    methods = {
        "ours": (lambda: ours((loc, conf, priors), targets), True),
        "seed": (lambda: ssd_pytorch_multibox_loss(loc, conf, priors, targets, num_classes), True),
        "torchvision": (lambda: torchvision_loss(tv_model, loc, conf, anchors_xyxy, targets), True),
        "ours_no_grad": (compute_no_grad, False),
    }
    if baseline is not None:
        before = baseline(num_classes, 0.5, True, 0, True, 3, 0.5, False)
        methods["baseline"] = (lambda: before((loc, conf, priors), targets), True)
    for fn, backward in methods.values():  # warm-up
        time_once(fn, loc, conf, backward)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, (fn, backward) in methods.items():
            times[name].append(time_once(fn, loc, conf, backward))
    return {name: (statistics.median(values) * 1000, min(values) * 1000) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="only B=32 (C=21 and C=81)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--baseline", default=None, help="git revision whose MultiBoxLoss is timed alongside")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where every loss runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [(32, 21), (32, 81)] if args.quick else [(8, 21), (8, 81), (32, 21), (32, 81)]
    repeats = args.repeats
    priors = prior_boxes(VOC_300)
    print(f"torch {torch.__version__}, {args.device}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, P={len(priors)}, {repeats} interleaved repeats, fwd+bwd; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory() as directory:
        baseline = None if args.baseline is None else baseline_ssd_core(args.baseline, Path(directory)).MultiBoxLoss
        print_table(cases, repeats, priors, baseline, args.baseline, torch.device(args.device))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


def print_table(
    cases, repeats: int, priors, baseline: type | None, revision: str | None, device: torch.device = CPU
) -> None:
    extra = "" if baseline is None else f" {revision} (ms) | seed / {revision} | torchvision / {revision} |"
    print()
    print("| B | C | statistic | ours (ms) | seed (ms) | torchvision (ms) | seed / ours | torchvision / ours "
          "| ours no-grad (ms) |" + extra)
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if extra else ""))
    for batch, num_classes in cases:
        ms = bench_case(batch, num_classes, repeats, priors, baseline, device)
        for i, stat in enumerate(("median", "min")):
            ours, seed, tv, no_grad = (ms[name][i] for name in ("ours", "seed", "torchvision", "ours_no_grad"))
            row = (f"| {batch} | {num_classes} | {stat} | {ours:.1f} | {seed:.1f} | {tv:.1f} | {seed / ours:.1f}x "
                   f"| {tv / ours:.1f}x | {no_grad:.1f} |")
            if baseline is not None:
                before = ms["baseline"][i]
                row += f" {before:.1f} | {seed / before:.1f}x | {tv / before:.1f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
