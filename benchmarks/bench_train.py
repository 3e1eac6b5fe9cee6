"""Training benchmark: ssd-small from scratch on the synthetic shapes set, on the CPU.

Default mode runs `ssd train` with a wall-clock budget of training time (evaluation excluded),
evaluates mAP@0.5 on a held-out synthetic split every N steps and reports training images/s and
when the goal (mAP@0.5 >= 0.6 within 10 minutes of CPU training) was reached:

    .venv/bin/python benchmarks/bench_train.py --minutes 10 --out benchmarks/results/train

By default one core trains (1 torch thread) while one data-loader process renders fresh images.

`--throughput-only` measures training images/s on random data only, e.g. on a GPU:

    python benchmarks/bench_train.py --device cuda --model ssd300 --batch-size 32 --amp --throughput-only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ssd_core.cli import main as ssd_main
from ssd_core.loss.multibox import MultiBoxLoss
from ssd_core.models import MODEL_NAMES, build_model
from ssd_core.training.trainer import TrainConfig, Trainer

GOAL_MAP_50 = 0.6
GOAL_SECONDS = 600.0
NVIDIA_V100_AMP_IMAGES_PER_S = 300.0  # NVIDIA's reference SSD300, for scale


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODEL_NAMES, default="ssd-small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--clip-grad-norm", type=float, default=10.0)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--minutes", type=float, default=10.0, help="training-time budget")
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--eval-images", type=int, default=200, help="held-out synthetic images")
    parser.add_argument("--train-images", type=int, default=100_000, help="synthetic training set size")
    parser.add_argument("--workers", type=int, default=1, help="data loader processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train"))
    parser.add_argument("--throughput-only", action="store_true", help="random data, images/s only")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of --throughput-only")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps of --throughput-only")
    return parser.parse_args(argv)


def _random_batch(batch_size: int, image_size: int, device: torch.device):
    """Images [B, 3, S, S] and two fixed-size objects per image (normalised xyxy, label, difficult)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    corner = torch.rand(batch_size, 2, 2, generator=generator) * 0.5  # [B, 2, (x1, y1)]
    boxes = torch.cat((corner, corner + 0.3), dim=-1)  # [B, 2, 4]
    labels = torch.tensor([[0.0, 1.0]]).expand(batch_size, 2)[..., None]  # [B, 2, 1]
    targets = torch.cat((boxes, labels, torch.zeros(batch_size, 2, 1)), dim=-1)  # [B, 2, 6]
    return images.to(device), [t.to(device) for t in targets]


def throughput(args: argparse.Namespace) -> dict[str, float]:
    """Training images/s of `args.model` on random data (after untimed warm-up steps)."""
    device = torch.device(args.device)
    num_classes = 21
    model = build_model(args.model, num_classes)
    criterion = MultiBoxLoss.ssd_pytorch(num_classes, use_gpu=device.type == "cuda")
    trainer = Trainer(model, criterion, TrainConfig(lr=1e-3, amp=args.amp), device)
    images, targets = _random_batch(args.batch_size, model.spec.image_size, device)
    for _ in range(args.warmup_steps):
        trainer.step(images, targets)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step(images, targets)  # returns floats: one host sync per step, as in real training
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    images_per_s = args.steps * args.batch_size / seconds
    amp = "bf16 AMP" if args.amp and device.type == "cuda" else "fp32"
    print(f"{args.model} on {device} ({amp}), batch {args.batch_size}: {images_per_s:.1f} training images/s")
    print(
        f"  ratio to NVIDIA's SSD300 V100 AMP reference ({NVIDIA_V100_AMP_IMAGES_PER_S:.0f}/s): "
        f"{images_per_s / NVIDIA_V100_AMP_IMAGES_PER_S:.2f}"
    )
    return {"images_per_second": images_per_s, "seconds": seconds}


def train_to_goal(args: argparse.Namespace) -> dict:
    """Run `ssd train` under a training-time budget and summarise its history.json."""
    argv = [
        "train", "--data", "synthetic", "--model", args.model, "--device", args.device,
        "--synthetic-images", str(args.train_images), "--eval-images", str(args.eval_images),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.warmup),
        "--clip-grad-norm", str(args.clip_grad_norm), "--eval-every", str(args.eval_every),
        "--steps", "1000000", "--time-limit", str(args.minutes * 60), "--workers", str(args.workers),
        "--checkpoint-dir", str(args.out), "--keep", "1", "--quiet",
        "--augment" if args.augment else "--no-augment",
    ]  # fmt: skip
    if ssd_main(argv) != 0:
        raise SystemExit("ssd train failed")
    history = json.loads((args.out / "history.json").read_text())
    print(f"\n{'step':>6} {'train s':>8} {'mAP@0.5':>8} {'mAP':>7}")
    for step, seconds, map_50, map_ in zip(
        history["eval_steps"], history["eval_elapsed_s"], history["map_50"], history["map"], strict=True
    ):
        print(f"{step:>6} {seconds:>8.0f} {map_50:>8.3f} {map_:>7.3f}")
    reached = [
        (step, seconds)
        for step, seconds, map_50 in zip(
            history["eval_steps"], history["eval_elapsed_s"], history["map_50"], strict=True
        )
        if map_50 >= GOAL_MAP_50 and seconds <= GOAL_SECONDS
    ]
    best = max(history["map_50"], default=0.0)
    print(
        f"\ntraining images/s: {history['images_per_second']:.1f} "
        f"({len(history['steps'])} steps x {args.batch_size} in {history['train_seconds']:.0f} s)"
    )
    if reached:
        print(
            f"goal mAP@0.5 >= {GOAL_MAP_50} reached at step {reached[0][0]} after {reached[0][1]:.0f} s: PASS"
        )
    else:
        print(
            f"goal mAP@0.5 >= {GOAL_MAP_50} within {GOAL_SECONDS:.0f} s not reached (best {best:.3f}): FAIL"
        )
    print(f"loss curve: {args.out / 'loss_curve.png'}; mAP curve: {args.out / 'map_curve.png'}")
    return {"reached": reached[0] if reached else None, "best_map_50": best, **history}


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.throughput_only:
        throughput(args)
    else:
        train_to_goal(args)


if __name__ == "__main__":
    main()
