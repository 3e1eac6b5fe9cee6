"""Data-parallel training on `torch.distributed`: the process group, DDP, per-rank data, global loss.

Run any `ssd train` command under `torchrun`; each process trains on its own shard of every batch:

  * `init_distributed` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK, joins the process group
    (NCCL on CUDA, gloo on CPU) and pins the process to GPU LOCAL_RANK;
  * `DistributedTrainer` wraps the model in `DistributedDataParallel` and normalises the loss by the
    positives of *all* ranks (`global_loss`), so the averaged gradient is the single-process gradient
    of the concatenated batch; a non-finite step is skipped by every rank or by none;
  * `distributed_sampler` shards a data set per rank (`DistributedSampler`, reshuffled by `set_epoch`).

Without torchrun's variables everything degrades to one plain process (`DistributedContext()`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from ssd_core.loss.criterion import LossCriterion
from ssd_core.loss.multibox import LossOutput
from ssd_core.loss.stats import ClassStats, MatchStats
from ssd_core.training.trainer import TrainConfig, Trainer

__all__ = [
    "DistributedContext",
    "DistributedTrainer",
    "GlobalLoss",
    "distributed_sampler",
    "gather_match_stats",
    "global_loss",
    "init_distributed",
]

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# MatchStats fields with one value per image, gathered as the columns of one float64 tensor
_PER_IMAGE_FIELDS = tuple(f.name for f in fields(MatchStats)
                          if f.name not in ("matched_ious", "normalizer", "per_class"))
_CLASS_SUM_FIELDS = tuple(f.name for f in fields(ClassStats) if f.name != "normalizer")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job; the default is a single, non-distributed process.

    Attributes:
        rank: global rank in [0, world_size).
        world_size: number of processes.
        local_rank: rank on this node (the GPU index on CUDA).
        device: this process's device.
        distributed: True once the process group is initialised (collectives are live).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, plots and writes checkpoints."""
        return self.rank == 0

    def all_true(self, flag: bool | Tensor) -> bool:
        """True when `flag` holds on every rank (an all_reduce MIN; every rank must call it)."""
        if not self.distributed:
            return bool(flag)
        value = torch.as_tensor(flag, device=self.device).to(torch.int32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def from_main(self, value: int) -> int:
        """Rank 0's `value` on every rank (a broadcast; every rank must call it), e.g. to stop together."""
        if not self.distributed:
            return int(value)
        tensor = torch.tensor([int(value)], device=self.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def check_same(self, value: int, what: str) -> None:
        """Raise ValueError on every rank unless all ranks hold the same `value` (every rank must call it)."""
        main_value = self.from_main(value)
        if not self.all_true(main_value == value):
            raise ValueError(
                f"{what} differs across ranks: {main_value} on rank 0, {value} on rank {self.rank}"
            )

    def barrier(self) -> None:
        """Wait until every rank has called it (e.g. while rank 0 evaluates); a no-op for one process."""
        if self.distributed:
            dist.barrier()

    def close(self, success: bool = True) -> None:
        """Leave the process group: a barrier first when the run succeeded, then destroy it."""
        if not self.distributed:
            return
        if success:
            self.barrier()
        dist.destroy_process_group()


def _int_variable(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: torch.device | str) -> DistributedContext:
    """Join the torchrun job this process belongs to, or return a single-process context.

    Args:
        device: the device type to train on (`cpu` or `cuda`; an index is replaced by LOCAL_RANK).

    Returns:
        The context; `distributed` is True when torchrun's RANK, WORLD_SIZE and LOCAL_RANK are set,
        after `init_process_group` (backend `nccl` on CUDA, `gloo` on CPU; MASTER_ADDR/MASTER_PORT
        from the environment) and, on CUDA, `torch.cuda.set_device(LOCAL_RANK)`.

    Raises:
        ValueError: some but not all of the variables are set, one is not an integer or out of
            range, or LOCAL_RANK names a GPU this node does not have.
    """
    device = torch.device(device)
    present = [name for name in _TORCHRUN_VARIABLES if name in os.environ]
    if not present:
        return DistributedContext(device=device)
    if len(present) != len(_TORCHRUN_VARIABLES):
        missing = sorted(set(_TORCHRUN_VARIABLES) - set(present))
        raise ValueError(f"torchrun environment incomplete: {', '.join(missing)} not set")
    rank, world_size, local_rank = (_int_variable(name) for name in _TORCHRUN_VARIABLES)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    if device.type == "cuda":
        if not 0 <= local_rank < torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank}: this node has {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")
    return DistributedContext(rank, world_size, local_rank, device, distributed=True)


def distributed_sampler(
    dataset: Dataset, context: DistributedContext, seed: int
) -> DistributedSampler | None:
    """This rank's shuffled shard of `dataset`, or None for a single process (shuffle as usual).

    Every rank draws the same permutation (from `seed` and the epoch: call `set_epoch` before each
    epoch) and keeps every world_size-th index from its rank on, so the ranks' shards are disjoint
    and equally long (the last indices repeat when len(dataset) is not a multiple of world_size).
    """
    if not context.distributed:
        return None
    return DistributedSampler(
        dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=seed
    )


def _all_gather_padded(values: Tensor, lengths: list[int]) -> list[Tensor]:
    """Every rank's 1-D `values` (rank r's has `lengths[r]` entries), in rank order."""
    padded = values.new_zeros(max(lengths))
    padded[: len(values)] = values
    chunks = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(chunks, padded)
    return [chunk[:n] for chunk, n in zip(chunks, lengths, strict=True)]


def gather_match_stats(stats: MatchStats) -> MatchStats:
    """The match statistics of the whole distributed batch (a collective: every rank must call it).

    Args:
        stats: this rank's statistics, per-image tensors [B_r] and matched_ious [K_r].

    Returns:
        MatchStats of the concatenated batch in rank order: per-image tensors [sum B_r],
        matched_ious [sum K_r], normalizer N = max(1, total positives) -- what one process computes
        on the concatenated batch.
    """
    per_image = torch.stack([getattr(stats, name).to(torch.float64) for name in _PER_IMAGE_FIELDS], dim=1)
    payload = torch.cat([per_image.flatten(), stats.matched_ious.to(torch.float64)])  # [B * F + K]
    sizes = torch.tensor([stats.batch_size, len(stats.matched_ious)], device=payload.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(all_sizes, sizes)
    shapes = [(int(b), int(k)) for b, k in torch.stack(all_sizes).tolist()]
    width = len(_PER_IMAGE_FIELDS)
    chunks = _all_gather_padded(payload, [b * width + k for b, k in shapes])
    rows = torch.cat(
        [chunk[: b * width].view(b, width) for chunk, (b, _) in zip(chunks, shapes, strict=True)]
    )
    ious = torch.cat([chunk[b * width :] for chunk, (b, _) in zip(chunks, shapes, strict=True)])
    columns = {name: rows[:, i].to(getattr(stats, name).dtype) for i, name in enumerate(_PER_IMAGE_FIELDS)}
    normalizer = columns["num_positives"].sum().clamp(min=1).to(stats.normalizer.dtype)
    return MatchStats(**columns, matched_ious=ious.to(stats.matched_ious.dtype), normalizer=normalizer,
                      per_class=_sum_class_stats(stats.per_class, normalizer))


def _sum_class_stats(local: ClassStats, normalizer: Tensor) -> ClassStats:
    """The per-class sums of all ranks (one all_reduce), with the global N."""
    parts = [getattr(local, name).to(torch.float64).reshape(-1) for name in _CLASS_SUM_FIELDS]  # [L] or [1] each
    total = torch.cat(parts)
    dist.all_reduce(total)
    sums = dict(zip(_CLASS_SUM_FIELDS, total.split([len(p) for p in parts]), strict=True))
    return ClassStats(**{name: value.reshape(getattr(local, name).shape).to(getattr(local, name).dtype)
                         for name, value in sums.items()}, normalizer=normalizer)


class _GlobalValue(torch.autograd.Function):
    """Forward: the global loss value; backward: the gradient flows to this rank's part instead."""

    @staticmethod
    def forward(ctx, local_part: Tensor, global_value: Tensor) -> Tensor:
        return global_value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def global_loss(output: LossOutput, world_size: int) -> LossOutput:
    """A rank's `MultiBoxLoss` output made global (a collective: every rank must call it).

    Each loss's value becomes the loss of the whole distributed batch, sum over ranks of the
    unnormalised sums divided by N = max(1, positives on all ranks), identical on every rank. Its
    gradient is that of (this rank's sum) / N * world_size, so DDP's gradient average over
    world_size ranks equals the single-process gradient of the concatenated batch.

    Args:
        output: `MultiBoxLoss.compute` on this rank's shard: losses normalised by the local N
            (`stats.normalizer`), so loss * local N is the local sum, gradient included.
        world_size: number of ranks DDP averages over.

    Returns:
        LossOutput(loss_l, loss_c, stats) with global values and `gather_match_stats` statistics.
    """
    stats = gather_match_stats(output.stats)
    scale = world_size / stats.normalizer.to(output.loss_l.dtype)  # []

    def make_global(local_loss: Tensor, per_image_sums: Tensor) -> Tensor:
        local_part = local_loss * output.stats.normalizer.to(local_loss.dtype) * scale
        global_value = per_image_sums.sum().to(local_loss.dtype) / stats.normalizer.to(local_loss.dtype)
        return _GlobalValue.apply(local_part, global_value)

    return LossOutput(
        make_global(output.loss_l, stats.loss_l_sum), make_global(output.loss_c, stats.loss_c_sum), stats
    )


class GlobalLoss:
    """A criterion whose `compute` is `global_loss` of the wrapped one's (see `global_loss`).

    Args:
        criterion: a `MultiBoxLoss` (anything with `compute -> LossOutput`).
        world_size: number of ranks.
    """

    def __init__(self, criterion: LossCriterion, world_size: int) -> None:
        self.criterion = criterion
        self.world_size = world_size

    def compute(
        self, predictions: tuple[Tensor, Tensor, Tensor], targets: Any, class_mask: Tensor | None = None
    ) -> LossOutput:
        """Same arguments as `MultiBoxLoss.compute`: loc [B, P, 4], conf [B, P, C], priors [P, 4],
        optional class mask [B, C] of this rank's images."""
        return global_loss(self.criterion.compute(predictions, targets, class_mask), self.world_size)


class DistributedTrainer(Trainer):
    """A `Trainer` for one rank of a torchrun job: DDP, global loss and statistics, joint skips.

    `model` is the DDP wrapper; `module` the wrapped network, whose state dict (no `module.`
    prefix) `state`, `weights` and `restore` use, so checkpoints are the single-process format.
    `StepResult.loss_l/loss_c/stats` are global (the whole distributed batch).

    Args:
        model: the network (moved to `context.device`; its weights are broadcast from rank 0).
        criterion: a `MultiBoxLoss`; wrapped in `GlobalLoss`.
        config: optimizer settings.
        context: from `init_distributed`, with `distributed` True.
        sync_batchnorm: convert BatchNorm layers to `nn.SyncBatchNorm` (statistics over the
            whole distributed batch; CUDA only in PyTorch).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: LossCriterion,
        config: TrainConfig,
        context: DistributedContext,
        *,
        sync_batchnorm: bool = False,
    ) -> None:
        if not context.distributed:
            raise ValueError("DistributedTrainer needs an initialised process group (run under torchrun)")
        if sync_batchnorm and context.device.type != "cuda":
            raise ValueError(f"sync_batchnorm: SyncBatchNorm needs CUDA, the device is {context.device}")
        module = model.to(context.device)
        if sync_batchnorm:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        wrapped = DistributedDataParallel(module, device_ids=device_ids)
        # global loss values and averaged gradients already agree across ranks; the all_reduce of
        # the finite flag keeps the skip joint whatever a rank saw locally
        super().__init__(
            wrapped, GlobalLoss(criterion, context.world_size), config, context.device,
            module=module, all_finite=context.all_true,
        )
        self.context = context
