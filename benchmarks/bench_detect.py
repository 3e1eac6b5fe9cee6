"""Time `detect` (threshold, decode, per-class NMS, top-k) against torchvision's `SSD.postprocess_detections`.

In process, on the same network outputs, repeats interleaved; with `--baseline REV` the `detect` of git revision
REV runs in the same loop. Outputs:
  * C = 4: the demo model (`ssd-small` trained on the synthetic shapes) on shapes images;
  * C = 21 and 81: ssd-small's P = 6132 priors with logits like a trained detector's: standard normal, the
    background raised by 8 on every prior, and on 200 priors per image one object class raised by 6 to 12: per
    image about 150 (prior, class) pairs score above 0.3, and 1000 (C = 21) or 2500 (C = 81) above 0.01.
Two score thresholds: 0.3 (what `/detect` is often asked for) and 0.01 (ssd.pytorch's evaluation setting).
Prints a markdown table of medians (ms per call) with the load average and the CPU.
Usage: python benchmarks/bench_detect.py [--repeats N] [--threads N] [--baseline REV]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_loss import baseline_ssd_core, torchvision_ssd  # noqa: E402
from service_backends import cpu_model  # noqa: E402

from ssd_core.data.images import model_inputs  # noqa: E402
from ssd_core.data.synthetic import ShapesDataset  # noqa: E402
from ssd_core.models import build_model  # noqa: E402
from ssd_core.models.demo import DEMO_MODEL, DEMO_NUM_CLASSES, DEMO_WEIGHTS  # noqa: E402
from ssd_core.models.postprocess import detect  # noqa: E402
from ssd_core.ops.boxes import point_form  # noqa: E402
from ssd_core.storage.weights_file import load_weights  # noqa: E402

IMAGE_SIZE = 256
TOP_K_PER_CLASS = 200
MAX_DETECTIONS = 100


def demo_outputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[float, float]]:
    """The demo model's loc [B, P, 4], conf [B, P, 4] and priors on `batch` shapes images, and its variances."""
    model = build_model(DEMO_MODEL, DEMO_NUM_CLASSES)
    model.load_state_dict(load_weights(DEMO_WEIGHTS))  # float16 file: copied into the float32 parameters
    model.eval()
    images = [ShapesDataset(batch, image_size=IMAGE_SIZE, seed=3)[i].image for i in range(batch)]
    with torch.inference_mode():
        loc, conf, priors = model(model_inputs(images, model.spec))
    return loc, conf, priors, model.spec.prior_config.variance


def detector_like_outputs(batch: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   tuple[float, float]]:
    """Random logits shaped like a trained detector's (module docstring) on ssd-small's priors."""
    model = build_model("ssd-small", num_classes).eval()
    generator = torch.Generator().manual_seed(num_classes)
    with torch.inference_mode():
        _, _, priors = model(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    num_priors = len(priors)
    loc = torch.randn(batch, num_priors, 4, generator=generator) * 0.5
    conf = torch.randn(batch, num_priors, num_classes, generator=generator)
    conf[..., 0] += 8.0
    for b in range(batch):
        objects = torch.randperm(num_priors, generator=generator)[:200]
        labels = torch.randint(1, num_classes, (200,), generator=generator)
        conf[b, objects, labels] += 6.0 + 6.0 * torch.rand(200, generator=generator)
    return loc, conf, priors, model.spec.prior_config.variance


def torchvision_postprocess(model, loc, conf, priors, threshold):
    """torchvision's SSD post-processing on the same outputs: anchors in the image's pixels (x1, y1, x2, y2)."""
    model.score_thresh, model.topk_candidates, model.detections_per_img = threshold, TOP_K_PER_CLASS, MAX_DETECTIONS
    anchors = point_form(priors) * IMAGE_SIZE
    head = {"bbox_regression": loc, "cls_logits": conf}
    return model.postprocess_detections(head, [anchors] * len(loc), [(IMAGE_SIZE, IMAGE_SIZE)] * len(loc))


def time_row(outputs: tuple, threshold: float, tv_model, before, repeats: int) -> tuple[int, dict[str, float]]:
    """(detections found, median ms per method) of one case."""
    loc, conf, priors, variances = outputs
    options = {"variances": variances, "score_threshold": threshold, "max_detections": MAX_DETECTIONS,
               "image_sizes": [(IMAGE_SIZE, IMAGE_SIZE)] * len(loc), "top_k_per_class": TOP_K_PER_CLASS}
    methods = {
        "ours": lambda: detect(loc, conf, priors, **options),
        "torchvision": lambda: torchvision_postprocess(tv_model, loc, conf, priors, threshold),
    }
    if before is not None:
        methods["before"] = lambda: before.detect(loc, conf, priors, **options)
    with torch.inference_mode():
        found = sum(len(d.scores) for d in methods["ours"]())
        for fn in methods.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(repeats):
            for name, fn in methods.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return found, {name: 1000 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--baseline", default=None, help="git revision whose detect is timed alongside")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as directory:
        before = None
        if args.baseline is not None:
            package = baseline_ssd_core(args.baseline, Path(directory))
            before = importlib.import_module(f"{package.__name__}.models.postprocess")
        header = "| C | B | threshold | detections | ours (ms) | torchvision (ms) | torchvision / ours |"
        rule = "|---|---|---|---|---|---|---|"
        if before is not None:
            header += f" {args.baseline} (ms) | {args.baseline} / ours |"
            rule += "---|---|"
        print(f"\n## detect: ssd-small outputs, {IMAGE_SIZE} px, top {TOP_K_PER_CLASS} per class, {MAX_DETECTIONS} per "
              f"image, {args.repeats} interleaved repeats, {args.threads} thread(s), {os.cpu_count()} CPUs "
              f"({cpu_model()}); load average {load_before:.2f} at the start\n")
        print(header)
        print(rule)
        for num_classes in (DEMO_NUM_CLASSES, 21, 81):
            tv_model = torchvision_ssd(num_classes)
            for batch in (1, 8):
                outputs = demo_outputs(batch) if num_classes == DEMO_NUM_CLASSES else detector_like_outputs(
                    batch, num_classes)
                for threshold in (0.3, 0.01):
                    found, ms = time_row(outputs, threshold, tv_model, before, args.repeats)
                    row = (f"| {num_classes} | {batch} | {threshold} | {found} | {ms['ours']:.2f} | "
                           f"{ms['torchvision']:.2f} | {ms['torchvision'] / ms['ours']:.1f}x |")
                    if before is not None:
                        row += f" {ms['before']:.2f} | {ms['before'] / ms['ours']:.1f}x |"
                    print(row, flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
