"""DDP training on gloo with 2 processes on loopback against one process on the concatenated batch.

BatchNorm: PyTorch's SyncBatchNorm is CUDA-only, so on CPU each rank normalises with its own shard's
batch statistics, which no single process on the concatenated batch reproduces. The equivalence test
therefore trains an ssd-small whose BatchNorm layers stay in eval mode (running statistics; the affine
weights still train), which makes every layer per-image. With ordinary train-mode BatchNorm the test
checks what DDP guarantees: identical parameters on both ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from ssd_core.data.datasets import collate
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.loss.multibox import MultiBoxLoss
from ssd_core.models import SmallConfig, SSDSmall, build_model
from ssd_core.storage.checkpoint import CheckpointStore
from ssd_core.training.distributed import DistributedTrainer, init_distributed
from ssd_core.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.xdist_group("distributed")

WORLD_SIZE = 2
IMAGES_PER_RANK = 2
STEPS = 3
IMAGE_SIZE = 96
CONFIG = TrainConfig(lr=0.05, warmup_steps=0)


class EvalBatchNormSSD(SSDSmall):
    """ssd-small whose BatchNorm layers use their running statistics even in train mode."""

    def train(self, mode: bool = True) -> EvalBatchNormSSD:
        super().train(mode)
        for layer in self.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.eval()
        return self


def _model(cls: type[SSDSmall]) -> SSDSmall:
    torch.manual_seed(0)
    return cls(ShapesDataset.num_classes, SmallConfig(image_size=IMAGE_SIZE))


def _criterion() -> MultiBoxLoss:
    return MultiBoxLoss.ssd_pytorch(ShapesDataset.num_classes, use_gpu=False)


def _batch(step: int):
    """The concatenated batch of `step`: images [WORLD_SIZE * IMAGES_PER_RANK, 3, S, S], targets."""
    size = WORLD_SIZE * IMAGES_PER_RANK
    dataset = ShapesDataset(size * (STEPS + 1), image_size=IMAGE_SIZE, seed=3, max_objects=3)
    samples = [dataset[i] for i in range(step * size, (step + 1) * size)]
    return collate(samples, (IMAGE_SIZE, (127.5,) * 3, (127.5,) * 3))


def _shard(step: int, rank: int):
    images, targets = _batch(step)
    part = slice(rank * IMAGES_PER_RANK, (rank + 1) * IMAGES_PER_RANK)
    return images[part], targets[part]


def _record(result) -> dict:
    return {
        "loss_l": result.loss_l,
        "loss_c": result.loss_c,
        "skipped": result.skipped,
        "normalizer": float(result.stats.normalizer),
        "num_positives": result.stats.num_positives.tolist(),
        "num_ground_truth": result.stats.num_ground_truth.tolist(),
        "totals": result.stats.totals(),
        "per_class": [{k: v for k, v in row.items() if k != "class_name"}
                      for row in result.stats.per_class.rows(["rectangle", "ellipse", "triangle"])],
    }


def _parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: train both models, a step non-finite on rank 1 only, the collectives; write results."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    context = init_distributed("cpu")
    trainer = DistributedTrainer(_model(EvalBatchNormSSD), _criterion(), CONFIG, context)
    records = [_record(trainer.step(*_shard(step, rank))) for step in range(STEPS)]
    save_file(trainer.weights(), f"{out}/eval_bn-{rank}.safetensors")

    before = trainer.weights()
    images, targets = _shard(STEPS, rank)
    if rank == 1:
        images[0, :, :8, :8] = float("nan")
    skipped = trainer.step(images, targets).skipped
    unchanged = all(torch.equal(before[k], v) for k, v in trainer.weights().items())

    state = trainer.state()
    trainer.restore(state.weights, state.optimizer_state, trainer.steps)  # single-process keys back into DDP
    restored = all(torch.equal(before[k], v) for k, v in trainer.weights().items())
    context.check_same(7, "a constant")
    try:
        context.check_same(rank, "the rank")
        rank_is_same = True
    except ValueError:
        rank_is_same = False

    plain = DistributedTrainer(_model(SSDSmall), _criterion(), CONFIG, context)
    for step in range(2):
        plain.step(*_shard(step, rank))
    save_file(_parameters(plain.module), f"{out}/train_bn-{rank}.safetensors")
    summary = {
        "records": records,
        "nan_step": {"skipped": skipped, "unchanged": unchanged, "skipped_steps": trainer.skipped_steps},
        "all_true_of_rank_is_0": context.all_true(rank == 0),
        "from_main_rank": context.from_main(rank),
        "restored": restored,
        "rank_is_same": rank_is_same,
    }
    Path(out, f"summary-{rank}.json").write_text(json.dumps(summary))
    context.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference() -> tuple[dict, list[dict]]:
    """One process, same initial weights, STEPS steps on the concatenated batches."""
    trainer = Trainer(_model(EvalBatchNormSSD), _criterion(), CONFIG, "cpu")
    records = [_record(trainer.step(*_batch(step))) for step in range(STEPS)]
    return trainer.weights(), records


def _summary(out: Path, rank: int) -> dict:
    return json.loads((out / f"summary-{rank}.json").read_text())


def _check_weights_equal_the_reference(out: Path, expected: dict) -> None:
    weights = [load_file(out / f"eval_bn-{rank}.safetensors") for rank in range(WORLD_SIZE)]
    initial = _model(EvalBatchNormSSD).state_dict()
    assert weights[0].keys() == weights[1].keys() == expected.keys()  # no DDP `module.` prefix
    moved = 0.0
    for name, tensor in expected.items():
        assert torch.equal(weights[0][name], weights[1][name]), name
        torch.testing.assert_close(weights[0][name], tensor, rtol=1e-4, atol=2e-6, msg=name)
        moved = max(moved, float((tensor - initial[name]).abs().max()))
    assert moved > 1e-3  # the steps changed the weights far beyond the tolerance


def _check_loss_and_statistics_are_global(out: Path, expected: list[dict]) -> None:
    for rank in range(WORLD_SIZE):
        for got, want in zip(_summary(out, rank)["records"], expected, strict=True):
            assert not got["skipped"] and not want["skipped"]
            assert got["normalizer"] == want["normalizer"] == sum(want["num_positives"])
            assert got["num_positives"] == want["num_positives"]  # all images, in rank order
            assert got["num_ground_truth"] == want["num_ground_truth"]
            assert got["loss_l"] == pytest.approx(want["loss_l"], rel=1e-4)
            assert got["loss_c"] == pytest.approx(want["loss_c"], rel=1e-4)
            assert got["totals"] == pytest.approx(want["totals"], rel=1e-4)
            assert len(got["per_class"]) == len(want["per_class"]) > 0
            for got_class, want_class in zip(got["per_class"], want["per_class"], strict=True):
                assert got_class == pytest.approx(want_class, rel=1e-4)


def _check_train_mode_batchnorm_parameters_are_identical(out: Path) -> None:
    rank0, rank1 = (load_file(out / f"train_bn-{rank}.safetensors") for rank in range(WORLD_SIZE))
    initial = dict(_model(SSDSmall).named_parameters())
    assert rank0.keys() == rank1.keys() == initial.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert any(not torch.equal(rank0[name], initial[name].detach()) for name in rank0)


def test_two_gloo_ranks_train_like_one_process_on_the_concatenated_batch(tmp_path):
    """One spawn of 2 ranks (process start-up dominates the cost), every check on its results."""
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    expected_weights, expected_records = _reference()
    # after STEPS steps: bit-identical ranks, equal to one process on the concatenated batches
    _check_weights_equal_the_reference(tmp_path, expected_weights)
    # every step's N, per-image counts, losses and totals are those of the concatenated batch
    _check_loss_and_statistics_are_global(tmp_path, expected_records)
    # ordinary (train-mode) BatchNorm: ranks still hold identical parameters
    _check_train_mode_batchnorm_parameters_are_identical(tmp_path)
    for rank in range(WORLD_SIZE):
        summary = _summary(tmp_path, rank)
        # NaN input on rank 1 only: both ranks skip, weights untouched
        assert summary["nan_step"] == {"skipped": True, "unchanged": True, "skipped_steps": 1}
        assert summary["all_true_of_rank_is_0"] is False
        assert summary["from_main_rank"] == 0
        assert summary["restored"] is True
        assert summary["rank_is_same"] is False  # check_same raised on every rank


def test_init_distributed_without_torchrun_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = init_distributed("cpu")
    assert (context.distributed, context.rank, context.world_size, context.is_main) == (False, 0, 1, True)
    assert context.all_true(True) and context.from_main(7) == 7


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0"}, "LOCAL_RANK, WORLD_SIZE not set"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x'"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2"),
    ],
)
def test_init_distributed_rejects_a_broken_torchrun_environment(monkeypatch, env, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        init_distributed("cpu")


def _torchrun_train(directory: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """`ssd train` (the real CLI) on a tiny synthetic set under torchrun with WORLD_SIZE gloo ranks."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
        "-m", "ssd_core.cli", "train", "--data", "synthetic", "--synthetic-images", "8",
        "--synthetic-size", "64", "--batch-size", "2", "--steps", str(steps), "--no-augment",
        "--device", "cpu", "--checkpoint-dir", str(directory), "--quiet", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=directory.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_ssd_train_under_torchrun_writes_one_checkpoint_set_from_rank_0_evaluates_and_resumes(tmp_path):
    directory = tmp_path / "ckpt"
    done = _torchrun_train(directory, 2, "--eval-every", "1", "--eval-images", "2")
    assert done.stdout.count("trained 2 steps") == 1  # rank 0 alone reports
    assert done.stdout.count("mAP@0.5") == 2  # rank 0 alone evaluates, at steps 1 and 2, the others wait
    history = json.loads((directory / "history.json").read_text())
    assert history["eval_steps"] == [1, 2]
    assert len(history["map_50"]) == len(history["map"]) == 2
    assert all(-1.0 <= value <= 1.0 for value in history["map_50"] + history["map"])
    assert (directory / "map_curve.png").stat().st_size > 0
    checkpoint_files = sorted(path.name for path in directory.glob("ckpt-*"))
    assert checkpoint_files == [
        "ckpt-00000001.json",
        "ckpt-00000001.optim.safetensors",
        "ckpt-00000001.safetensors",
    ]
    loaded = CheckpointStore(directory).load_latest()
    assert (loaded.meta["step"], loaded.meta["world_size"]) == (2, WORLD_SIZE)
    model = build_model(loaded.meta["model"], loaded.meta["num_classes"])
    model.load_state_dict(loaded.state_dict)  # strict: the single-process format, no `module.` prefix
    assert loaded.optimizer_state is not None
    assert json.loads((directory / "history.json").read_text())["steps"] == [1, 2]

    done = _torchrun_train(directory, 3, "--resume")  # every rank restores version 1, then one step
    assert done.stdout.count("trained 3 steps") == 1
    assert [(info.version, info.step) for info in CheckpointStore(directory).versions()] == [(1, 2), (2, 3)]
    assert json.loads((directory / "history.json").read_text())["steps"] == [3]
