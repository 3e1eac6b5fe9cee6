"""The offline training run of `ssd train`.

`run_training(args)` trains `args.model` on `args.data` (a `load_dataset` spec) for `args.steps` steps,
single-process or under torchrun (DDP, one data shard per rank; rank 0 logs, evaluates and saves), and
writes `CheckpointStore` versions (meta: `storage.checkpoint_meta`), plus `history.json`,
`loss_curve.png` and (with `--eval-every`) `map_curve.png` in `args.checkpoint_dir`; with `--weights-out`
also the final weights as a released weights file with its card (`storage.weights_file`; how the shipped
demo model is made).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import count
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssd_core.data.augment import ssd_augmentation
from ssd_core.data.datasets import CocoDataset, VOCDataset, collate
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.evaluation.mean_ap import evaluate
from ssd_core.evaluation.plotting import save_curves
from ssd_core.loss.multibox import MultiBoxLoss
from ssd_core.models import SSD, build_model
from ssd_core.models.devices import resolve_device
from ssd_core.storage.checkpoint import CheckpointStore
from ssd_core.storage.checkpoint_meta import checkpoint_meta, next_version, recorded_priors
from ssd_core.storage.weights_file import save_weights
from ssd_core.training.distributed import (
    DistributedContext,
    DistributedTrainer,
    distributed_sampler,
    init_distributed,
)
from ssd_core.training.trainer import TrainConfig, Trainer

__all__ = ["load_dataset", "run_training"]


def load_dataset(spec: str, *, split: str, synthetic_images: int, synthetic_size: int = 256):
    """The data set named by a `--data` value.

    Args:
        spec: `synthetic`, `voc:ROOT` or `coco:IMAGES_DIR:ANNOTATIONS.json`.
        split: synthetic split name (`train` / `val`: disjoint images); VOC image-set name
            (`trainval`, `test`, ...); ignored for COCO (the annotation file is the split).
        synthetic_images: number of synthetic images.
        synthetic_size: side of the synthetic images (ssd-small's input by default: no resize).

    Returns:
        A data set of `Sample`s with a `class_names` attribute.
    """
    kind, _, rest = spec.partition(":")
    if kind == "synthetic" and not rest:
        return ShapesDataset(synthetic_images, image_size=synthetic_size, split=split)
    if kind == "voc" and rest:
        return VOCDataset(rest, split=split)
    if kind == "coco" and ":" in rest:
        images_dir, annotations = rest.rsplit(":", 1)
        return CocoDataset(images_dir, annotations)
    raise ValueError(f"--data must be synthetic, voc:ROOT or coco:IMAGES_DIR:ANN.json, got {spec!r}")


def _dataset(args: argparse.Namespace, spec: str, split: str, synthetic_images: int):
    """`load_dataset` with `--synthetic-size` (training and held-out sets alike)."""
    return load_dataset(
        spec, split=split, synthetic_images=synthetic_images, synthetic_size=args.synthetic_size
    )


def _batches(
    dataset, model: SSD, args: argparse.Namespace, generator: torch.Generator, sampler=None
) -> Iterator:
    """Endless shuffled training batches (images [B, 3, S, S], targets list[Tensor[n_i, 6]]).

    `sampler`: this rank's `DistributedSampler` under torchrun (None: shuffle the whole data set).
    """
    augment = ssd_augmentation(args.augment, fill=model.spec.pixel_mean)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(dataset if sampler is None else sampler) >= args.batch_size,
        generator=generator,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        collate_fn=partial(collate, spec=model.spec, augment=augment),
    )
    for epoch in count():
        if sampler is not None:
            sampler.set_epoch(epoch)  # a new permutation, the same on every rank
        yield from loader


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The command's arguments as JSON-able values, for the checkpoint sidecar."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "handler"}


@dataclass
class _History:
    """What `ssd train` records: per-step losses and lr, periodic mAP, throughput."""

    steps: list[int] = field(default_factory=list)
    loss_l: list[float] = field(default_factory=list)
    loss_c: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    map_50: list[float] = field(default_factory=list)
    map: list[float] = field(default_factory=list)
    eval_elapsed_s: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    images_per_second: float = 0.0
    train_seconds: float = 0.0

    def write(self, directory: Path) -> None:
        (directory / "history.json").write_text(json.dumps(self.__dict__, indent=1))
        if self.steps:
            losses = {
                "loc (Smooth L1)": self.loss_l,
                "conf (cross-entropy)": self.loss_c,
                "total": [a + b for a, b in zip(self.loss_l, self.loss_c, strict=True)],
            }
            save_curves(
                directory / "loss_curve.png", self.steps, losses, title="training loss", ylabel="loss"
            )
        if self.eval_steps:
            maps = {"mAP@0.5": self.map_50, "mAP@[.5:.95]": self.map}
            save_curves(
                directory / "map_curve.png", self.eval_steps, maps, title="held-out mAP", ylabel="mAP"
            )


def run_training(args: argparse.Namespace) -> int:
    """`ssd train`: the handler of its parsed arguments; returns the exit status."""
    device = resolve_device(args.device, "--device")
    if args.amp and device.type != "cuda":
        raise ValueError(f"--amp (bfloat16 autocast) needs CUDA; --device {args.device} runs on {device.type}")
    context = init_distributed(device)  # single process unless run by torchrun
    try:
        status = _train_rank(args, context)
    except BaseException:
        context.close(success=False)
        raise
    context.close()
    return status


def _train_rank(args: argparse.Namespace, context: DistributedContext) -> int:
    torch.manual_seed(args.seed)
    dataset = _dataset(args, args.data, args.split, args.synthetic_images)
    num_classes = args.num_classes or len(dataset.class_names) + 1
    if num_classes < len(dataset.class_names) + 1:
        raise ValueError(f"--num-classes {num_classes} < {len(dataset.class_names)} classes + background")
    model = build_model(args.model, num_classes, args.priors)
    trainer = _trainer(args, context, model, num_classes)
    store = CheckpointStore(args.checkpoint_dir, keep=args.keep)
    if args.resume:
        _resume(trainer, model, store, context)
    run = _TrainingRun(args, context, dataset, model, trainer, store)
    run.train()
    run.finish()
    return 0


def _trainer(args: argparse.Namespace, context: DistributedContext, model: SSD, num_classes: int) -> Trainer:
    """The trainer of `model` with ssd.pytorch's loss: DDP under torchrun, else single-process."""
    criterion = MultiBoxLoss.ssd_pytorch(num_classes, use_gpu=context.device.type == "cuda")
    config = TrainConfig(
        lr=args.lr, warmup_steps=args.warmup, clip_grad_norm=args.clip_grad_norm, amp=args.amp
    )
    if not context.distributed:
        return Trainer(model, criterion, config, context.device)
    trainer = DistributedTrainer(model, criterion, config, context, sync_batchnorm=args.sync_bn)
    torch.manual_seed(args.seed + context.rank)  # same initial weights, different augmentation per rank
    return trainer


def _resume(trainer: Trainer, model: SSD, store: CheckpointStore, context: DistributedContext) -> None:
    """`--resume`: every rank restores the newest checkpoint in `store` (none: start afresh), refusing
    one trained with other priors than `model`'s."""
    loaded = store.load_latest()
    context.check_same(loaded.meta["version"] if loaded else -1, "--resume: checkpoint version")
    if loaded is None:
        return
    priors, expected = recorded_priors(loaded.meta), model.spec.prior_set
    if priors != expected:
        raise ValueError(f"--resume: the checkpoint has priors {priors!r}, this run {expected!r}; pass --priors {priors}")
    trainer.restore(loaded.state_dict, loaded.optimizer_state, loaded.meta["step"], loaded.training_weights)


class _TrainingRun:
    """One rank's training loop: its batches, history and progress bar, and the training time, which
    leaves out evaluation. Under torchrun rank 0 alone logs, evaluates the held-out set and saves."""

    def __init__(
        self, args: argparse.Namespace, context: DistributedContext, dataset, model: SSD, trainer: Trainer,
        store: CheckpointStore,
    ) -> None:
        self.args = args
        self.context = context
        self.dataset = dataset
        self.trainer = trainer
        self.model = model  # unwrapped: under torchrun the trainer holds it in DDP
        self.store = store
        self.directory = Path(args.checkpoint_dir)
        self.log = tqdm.write if context.is_main else _silent
        self.val_set = None
        if (args.eval_every or args.weights_out) and context.is_main:  # under torchrun rank 0 evaluates alone
            self.val_set = _dataset(args, args.val_data or args.data, args.val_split, args.eval_images)
        self.history = _History()
        generator = torch.Generator().manual_seed(args.seed + context.rank)
        sampler = distributed_sampler(dataset, context, args.seed)
        self.batches = _batches(dataset, self.model, args, generator, sampler)
        self.start = time.perf_counter()
        self.eval_seconds = 0.0
        self.running_loss: float | None = None  # exponential moving average, for the progress bar
        self.progress = tqdm(
            total=args.steps, initial=trainer.steps, desc="train", disable=args.quiet or not context.is_main
        )

    def train_seconds(self) -> float:
        """Seconds since the start, evaluation left out."""
        return time.perf_counter() - self.start - self.eval_seconds

    def train(self) -> None:
        """Step up to `--steps` (or `--time-limit`), evaluating every `--eval-every` and saving every
        `--save-every` recorded steps."""
        args, trainer = self.args, self.trainer
        while trainer.steps < args.steps:
            if args.time_limit and self.context.from_main(self.train_seconds() > args.time_limit):
                self.log(f"time limit of {args.time_limit} s of training reached at step {trainer.steps}")
                break
            if not self.step():
                continue
            if args.eval_every and trainer.steps % args.eval_every == 0:
                self.evaluate()
            if args.save_every and trainer.steps % args.save_every == 0:
                self.save()
        self.progress.close()

    def step(self) -> bool:
        """One optimizer step on the next batch, recorded in the history; False if it was skipped."""
        images, targets = next(self.batches)  # [B, 3, S, S], list of B Tensor[n_i, 6]
        result = self.trainer.step(images, targets)
        if result.skipped:
            self.log(f"step {self.trainer.steps}: non-finite loss or gradient, skipped")
            return False
        loss = result.loss_l + result.loss_c
        self.running_loss = loss if self.running_loss is None else 0.95 * self.running_loss + 0.05 * loss
        self.history.steps.append(self.trainer.steps)
        self.history.loss_l.append(result.loss_l)
        self.history.loss_c.append(result.loss_c)
        self.history.lr.append(result.lr)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{self.running_loss:.3f}", lr=f"{result.lr:.2g}")
        return True

    def evaluate(self) -> None:
        """Rank 0 scores the held-out set with the unwrapped network while the other ranks wait."""
        eval_start = time.perf_counter()
        scores = None
        if self.val_set is not None:
            scores = evaluate(self.model, self.val_set, batch_size=self.args.batch_size, device=self.context.device)
        self.context.barrier()
        self.eval_seconds += time.perf_counter() - eval_start
        history = self.history
        history.eval_steps.append(self.trainer.steps)  # on every rank: it decides the final evaluation
        if scores is not None:
            history.map_50.append(scores["map_50"])
            history.map.append(scores["map"])
            history.eval_elapsed_s.append(self.train_seconds())
            self.log(f"step {self.trainer.steps}: mAP@0.5 {scores['map_50']:.4f}  mAP {scores['map']:.4f}")

    def save(self) -> None:
        """Rank 0 writes history.json, the curves and, unless this step is saved already, a checkpoint."""
        if not self.context.is_main:
            return
        self.history.write(self.directory)
        store, trainer = self.store, self.trainer
        if store.versions() and store.versions()[-1].step == trainer.steps:
            return  # already saved at this step (--save-every divides the step count)
        state = trainer.state()
        meta = checkpoint_meta(
            self.model,
            self.dataset.class_names,
            next_version(store),
            trainer.steps,
            {"config": _config(self.args), "world_size": self.context.world_size},
        )
        store.save(state.weights, meta, state.optimizer_state, state.training_weights)

    def finish(self) -> None:
        """A last evaluation unless the run ended on one, the throughput, and the final save."""
        args, trainer, history = self.args, self.trainer, self.history
        evaluates = args.eval_every or args.weights_out  # the card of --weights-out records the final mAP
        if evaluates and history.steps and history.eval_steps[-1:] != [trainer.steps]:
            self.evaluate()  # the run ended between evaluation points
        history.skipped_steps = trainer.skipped_steps
        history.train_seconds = self.train_seconds()
        history.images_per_second = (
            len(history.steps) * args.batch_size * self.context.world_size / max(history.train_seconds, 1e-9)
        )
        self.save()
        if args.weights_out and self.context.is_main:
            self.release(Path(args.weights_out))
        self.log(
            f"trained {trainer.steps} steps ({trainer.skipped_steps} skipped), {history.images_per_second:.1f} "
            f"images/s; checkpoints, history.json and loss_curve.png in {self.directory}"
        )


    def release(self, path: Path) -> None:
        """`--weights-out`: the served weights as float16 safetensors at `path`, and the card beside it."""
        history, spec = self.history, self.model.spec
        card = {
            "model": spec.name,
            "num_classes": spec.num_classes,
            "priors": spec.prior_set,
            "class_names": list(self.dataset.class_names),
            "steps": self.trainer.steps,
            "command": self.args.command_line,
            "held_out": {
                "data": self.args.val_data or self.args.data,
                "split": self.args.val_split,
                "images": len(self.val_set),
                "map_50": round(history.map_50[-1], 4),
                "map": round(history.map[-1], 4),
            },
            "train_seconds": round(history.train_seconds),
            "torch": torch.__version__,
        }
        card_file = save_weights(self.trainer.state().weights, path, card)
        self.log(f"weights in {path} (float16), card in {card_file}: held-out mAP@0.5 {card['held_out']['map_50']}")


def _silent(message: str) -> None:
    """The log of ranks other than 0 under torchrun: nothing."""
