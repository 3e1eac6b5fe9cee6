"""Fine-tuning trained weights with and without the warm-up, in process (not a timed test).

The demo model (`ssd-small` trained on `ShapesDataset`) takes the service's clean jobs as a deployment
started with `SSD_WEIGHTS=demo` would: jobs of 8 new images x 4 steps, one replayed image per new one,
the service's recipe (AdamW, clipping 10, the served EMA 0.99 / tau 50), the optimizer fresh. After each
`--every` jobs, the served (EMA) weights' loss on 64 `split="validation"` images and their mAP@0.5 on the
same images are printed, for each `--warmup` given.

Run: `nice -n 10 python benchmarks/bench_warmup.py --warmup 0,100 --jobs 8`.
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from safetensors.torch import load_file

from ssd_core import MultiBoxLoss
from ssd_core.data.datasets import Sample, collate
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.evaluation.mean_ap import evaluate
from ssd_core.models import SSD, build_model
from ssd_core.models.demo import DEMO_MODEL, DEMO_NUM_CLASSES, DEMO_WEIGHTS
from ssd_core.online.replay import balanced_draw
from ssd_core.training.ema import EMAConfig
from ssd_core.training.trainer import TrainConfig, Trainer

JOB_IMAGES, JOB_STEPS = 8, 4


def validation_loss(model: SSD, criterion: MultiBoxLoss, samples: list[Sample]) -> float:
    model.eval()
    with torch.no_grad():
        images, targets = collate(samples, model.spec)  # [N, 3, S, S], list[[n, 6]]
        loss_l, loss_c = criterion(model(images), targets)[:2]
    return float(loss_l + loss_c)


def run(warmup: int, jobs: int, every: int, lr: float) -> None:
    torch.manual_seed(0)
    model = build_model(DEMO_MODEL, DEMO_NUM_CLASSES)
    model.load_state_dict({k: v.float() for k, v in load_file(str(DEMO_WEIGHTS)).items()})
    criterion = MultiBoxLoss.ssd_pytorch(DEMO_NUM_CLASSES, use_gpu=False)
    config = TrainConfig(lr=lr, optimizer="adamw", warmup_steps=warmup, clip_grad_norm=10.0, ema=EMAConfig(0.99, 50.0))
    trainer = Trainer(model, criterion, config, "cpu")
    validation = ShapesDataset(64, seed=2, split="validation")
    held_out = [validation[i] for i in range(len(validation))]
    train = ShapesDataset(JOB_IMAGES * jobs, seed=7, split="train")
    memory: list[Sample] = []
    rng = random.Random(0)
    for job in range(jobs + 1):
        if job:
            samples = [train[i] for i in range(JOB_IMAGES * (job - 1), JOB_IMAGES * job)]
            for _ in range(JOB_STEPS):
                drawn = balanced_draw([s.labels.tolist() for s in memory], len(samples) if memory else 0, rng)
                images, targets = collate(samples + [memory[i] for i in drawn], model.spec)  # [B, 3, S, S]
                trainer.step(images, targets)
            memory += samples
        if job % every == 0:
            served = trainer.published
            print(json.dumps({"warmup": warmup, "lr": lr, "jobs": job, "steps": trainer.steps,
                              "validation_loss": round(validation_loss(served, criterion, held_out), 4),
                              "map_50": round(evaluate(served, validation, batch_size=16, device="cpu")["map_50"], 4)}),
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", default="0,100", help="comma list of SSD_WARMUP_STEPS values")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for warmup in (int(w) for w in args.warmup.split(",")):
        run(warmup, args.jobs, args.every, args.lr)


if __name__ == "__main__":
    main()
