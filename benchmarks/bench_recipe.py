"""The online recipe, measured in process: which trainer settings make a fresh ssd-small learn fast
from /finetune-sized jobs (issue 11, item 4).

Every variant starts from the same fresh `ssd-small` (seed 0) and sees the same stream of jobs, as the
service runs them: job j is `ShapesDataset(split="train")` images 8j .. 8j+7, trained for 4 steps on
that fixed batch (no augmentation, the /finetune default); `--job-images`, `--job-steps` and `--augment`
give other job shapes (the annotation stream's: 8 images x 32 steps, `--augment flip`). With replay, each step adds `ratio`
replayed images per new image, drawn class-balanced (`ssd_core.online.replay.balanced_draw`) from all
earlier jobs' images (fewer than SSD_REPLAY_MAX_IMAGES here, so the memory holds them all). The model
that would be served is scored by held-out mAP@0.5 (`ssd_core.evaluation.mean_ap.evaluate`, `split="val"`)
after the listed job counts: the raw weights and, side by side in the same run, the EMA of them for
each `--ema` decay:tau (an EMA never changes the training trajectory, so one run measures them all;
each is a `ModelEMA` updated after every completed step, as `Trainer` does with `TrainConfig.ema`).

Each variant appends one JSON line per evaluation to `--out`, so variants can run in separate
processes (one torch thread each) and be tabulated together with `--table`:

    nice -n 10 python benchmarks/bench_recipe.py --variants adamw-1e-3,sgd-0.02 --jobs 100
    python benchmarks/bench_recipe.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from ssd_core import MultiBoxLoss
from ssd_core.data.augment import AUGMENTATIONS, ssd_augmentation
from ssd_core.data.datasets import collate
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.evaluation.mean_ap import evaluate
from ssd_core.models import build_model
from ssd_core.online.replay import balanced_draw
from ssd_core.training.ema import EMAConfig, ModelEMA
from ssd_core.training.trainer import TrainConfig, Trainer

# what each job trains on (--augment): /finetune's default is none; the annotation stream's shape is
# --job-images 8 --job-steps 16..32
JOB_AUGMENTATIONS = {"none": None, **AUGMENTATIONS}  # the service's named augmentations, and none


def _sgd(lr: float, warmup: int = 0, clip: float | None = None) -> TrainConfig:
    return TrainConfig(lr=lr, warmup_steps=warmup, clip_grad_norm=clip)


def _adamw(lr: float, warmup: int = 0, clip: float | None = None) -> TrainConfig:
    return TrainConfig(lr=lr, optimizer="adamw", warmup_steps=warmup, clip_grad_norm=clip)


# name -> (trainer settings, replayed images per new image)
VARIANTS: dict[str, tuple[TrainConfig, float]] = {
    "sgd-1e-3": (_sgd(1e-3), 0),  # today's service default
    "sgd-0.02": (_sgd(0.02), 0),  # the best-known rate
    "sgd-0.05-wu100-clip10": (_sgd(0.05, 100, 10.0), 0),  # the offline recipe's rate, made safe
    "sgd-0.02-wu100-clip10": (_sgd(0.02, 100, 10.0), 0),
    "adamw-1e-3-wu100-clip10": (_adamw(1e-3, 100, 10.0), 0),
    "adamw-3e-4-wu100-clip10": (_adamw(3e-4, 100, 10.0), 0),
    "adamw-3e-3-wu100-clip10": (_adamw(3e-3, 100, 10.0), 0),
    "adamw-1e-3-wu100-clip10-r1": (_adamw(1e-3, 100, 10.0), 1),
    "adamw-3e-4-wu100-clip10-r1": (_adamw(3e-4, 100, 10.0), 1),
    "adamw-3e-4-wu20-clip10": (_adamw(3e-4, 20, 10.0), 0),
    "adamw-3e-4-wu20-clip10-r1": (_adamw(3e-4, 20, 10.0), 1),
    "adamw-3e-4-wu20-clip10-r3": (_adamw(3e-4, 20, 10.0), 3),
    "sgd-0.05-wu100-clip10-r1": (_sgd(0.05, 100, 10.0), 1),
}


def _evaluate(name: str, model, val, trainer: Trainer, job: int, train_s: float, losses, out: Path) -> None:
    scores = evaluate(model, val, batch_size=16, device="cpu")
    record = {
        "variant": name, "jobs": job, "steps": trainer.steps, "skipped": trainer.skipped_steps,
        "map_50": round(scores["map_50"], 4), "loss_last_job": round(sum(losses[-4:]) / 4, 3),
        "loss_max": round(max(losses), 2), "train_s": round(train_s, 1),
        "load": round(os.getloadavg()[0], 2), "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    print(json.dumps(record), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


def run_variant(
    name: str, args: argparse.Namespace, eval_at: list[int], emas: list[EMAConfig], out: Path
) -> None:
    config, ratio = VARIANTS[name]
    jobs, images_per_job = args.jobs, args.job_images
    if (args.job_images, args.job_steps, args.augment) != (8, 4, "none"):
        name = f"{name}-{args.job_images}x{args.job_steps}-{args.augment}"
    torch.manual_seed(0)
    model = build_model("ssd-small", ShapesDataset.num_classes)
    criterion = MultiBoxLoss.ssd_pytorch(ShapesDataset.num_classes, use_gpu=False)
    trainer = Trainer(model, criterion, config, "cpu")
    averages = {f"{name}-ema{c.decay}-tau{c.tau:g}": ModelEMA(trainer.module, c) for c in emas}
    train = ShapesDataset(images_per_job * jobs, seed=0, split="train")
    val = ShapesDataset(args.val_images, seed=0, split="val")
    augment_config = JOB_AUGMENTATIONS[args.augment]
    augment = None if augment_config is None else ssd_augmentation(fill=model.spec.pixel_mean, config=augment_config)
    rng = random.Random(0)
    memory = []  # every earlier job's samples
    losses: list[float] = []
    start = time.perf_counter()
    for job in range(1, jobs + 1):
        samples = [train[i] for i in range(images_per_job * (job - 1), images_per_job * job)]
        for _ in range(args.job_steps):
            k = round(ratio * len(samples)) if memory else 0
            replayed = [memory[i] for i in balanced_draw([s.labels.tolist() for s in memory], k, rng)]
            images, targets = collate(samples + replayed, model.spec, augment)  # [B, 3, S, S], list[[n, 6]]
            result = trainer.step(images, targets)
            losses.append(result.loss_l + result.loss_c)
            for average in averages.values():
                if not result.skipped:
                    average.update(trainer.module)
        memory.extend(samples)
        if job in eval_at:
            train_s = time.perf_counter() - start
            _evaluate(name, trainer.module, val, trainer, job, train_s, losses, out)
            for ema_name, average in averages.items():
                _evaluate(ema_name, average.module, val, trainer, job, train_s, losses, out)


def print_table(path: Path) -> None:
    rows: dict[str, dict[int, dict]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        rows.setdefault(record["variant"], {})[record["jobs"]] = record
    counts = sorted({j for r in rows.values() for j in r})
    print("| variant | " + " | ".join(f"mAP@0.5 @{j} jobs" for j in counts) + " | max step loss | train s | load |")
    print("|---|" + "---|" * (len(counts) + 3))
    for name, by_jobs in rows.items():
        last = by_jobs[max(by_jobs)]
        cells = [f"{by_jobs[j]['map_50']:.3f}" if j in by_jobs else "" for j in counts]
        print(f"| {name} | " + " | ".join(cells) + f" | {last['loss_max']} | {last['train_s']} | {last['load']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--eval-at", default="25,50,100,200,300")
    parser.add_argument("--val-images", type=int, default=96)
    parser.add_argument("--job-images", type=int, default=8)
    parser.add_argument("--job-steps", type=int, default=4)
    parser.add_argument("--augment", choices=JOB_AUGMENTATIONS, default="none")
    parser.add_argument("--ema", default="0.99:50,0.995:100,0.998:200", help="decay:tau list ('' for none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recipe/results.jsonl"))
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args()
    if args.table:
        print_table(args.out)
        return
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    eval_at = [int(j) for j in args.eval_at.split(",")]
    emas = [EMAConfig(float(d), float(t)) for d, t in (item.split(":") for item in args.ema.split(",") if item)]
    for name in args.variants.split(","):
        run_variant(name, args, eval_at, emas, args.out)


if __name__ == "__main__":
    main()
