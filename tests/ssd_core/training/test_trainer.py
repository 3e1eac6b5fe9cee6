"""Trainer: warm-up schedule, overfitting one batch, skipped non-finite steps, clipping, recovery."""

from __future__ import annotations

import copy

import pytest
import torch

from ssd_core import MultiBoxLoss, pad_targets
from ssd_core.data.datasets import collate
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.models import SmallConfig, SSDSmall
from ssd_core.storage.checkpoint import CheckpointStore
from ssd_core.training.trainer import TrainConfig, Trainer

IMAGE_SIZE = 160  # ssd-small at a reduced input keeps every test to a few seconds on one core


def _model(seed: int = 0) -> SSDSmall:
    torch.manual_seed(seed)
    return SSDSmall(ShapesDataset.num_classes, SmallConfig(image_size=IMAGE_SIZE))


def _criterion() -> MultiBoxLoss:
    return MultiBoxLoss.ssd_pytorch(ShapesDataset.num_classes, use_gpu=False)


def _batch(n: int = 4, seed: int = 0):
    dataset = ShapesDataset(n, image_size=IMAGE_SIZE, seed=seed)
    return collate([dataset[i] for i in range(n)], (IMAGE_SIZE, (127.5,) * 3, (127.5,) * 3))


def _trainer(config: TrainConfig | None = None, seed: int = 0) -> Trainer:
    return Trainer(_model(seed), _criterion(), config or TrainConfig(lr=0.01), "cpu")


def _snapshot(trainer: Trainer) -> tuple[dict, dict]:
    return copy.deepcopy(trainer.model.state_dict()), copy.deepcopy(trainer.optimizer.state_dict())


def _assert_tensors_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_same_state(trainer: Trainer, snapshot: tuple[dict, dict]) -> None:
    model_state, optimizer_state = snapshot
    _assert_tensors_equal(trainer.model.state_dict(), model_state)
    current = trainer.optimizer.state_dict()
    assert current["param_groups"] == optimizer_state["param_groups"]
    assert current["state"].keys() == optimizer_state["state"].keys()
    for index, values in optimizer_state["state"].items():
        _assert_tensors_equal(current["state"][index], values)  # momentum buffers, bitwise


def test_warmup_is_linear_then_constant():
    config = TrainConfig(lr=0.1, warmup_steps=4)
    assert [config.lr_at(s) for s in range(6)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert TrainConfig(lr=0.1).lr_at(0) == 0.1


@pytest.mark.parametrize(
    ("field", "value"), [("lr", 0.0), ("lr", float("nan")), ("warmup_steps", -1), ("clip_grad_norm", 0.0)]
)
def test_bad_config_is_a_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_overfits_one_fixed_batch():
    images, targets = _batch(4)
    trainer = _trainer(TrainConfig(lr=0.05, warmup_steps=5))
    results = [trainer.step(images, targets) for _ in range(25)]
    losses = [r.loss_l + r.loss_c for r in results]
    assert not any(r.skipped for r in results)
    assert trainer.steps == 25 and trainer.skipped_steps == 0
    assert losses[-1] < 0.5 * losses[0], losses
    assert [r.lr for r in results[:6]] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05, 0.05])
    totals = results[-1].stats.totals()
    assert totals["num_ground_truth"] == sum(len(t) for t in targets)
    assert totals["num_positives"] > 0


def test_step_uses_lr_override_and_padded_targets():
    images, targets = _batch(2)
    listed, padded = _trainer(), _trainer()
    a = listed.step(images, targets, lr=0.02)
    b = padded.step(images, pad_targets(targets), lr=0.02)
    assert a.lr == b.lr == 0.02
    assert listed.optimizer.param_groups[0]["lr"] == 0.02
    assert a.loss_l == pytest.approx(b.loss_l) and a.loss_c == pytest.approx(b.loss_c)
    _assert_tensors_equal(listed.model.state_dict(), padded.model.state_dict())
    with pytest.raises(ValueError, match="lr"):
        listed.step(images, targets, lr=-1.0)


def _nan_images(images, targets):
    return images.clone().fill_(float("nan")), targets


def _inf_gradient(trainer):
    """A finite loss whose gradient on one conf-head bias is infinite."""
    handle = trainer.model.conf[0].bias.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    return handle


def test_non_finite_loss_is_skipped_and_changes_nothing():
    images, targets = _batch(2)
    trainer = _trainer()
    trainer.step(images, targets)
    trainer.step(images, targets)  # momentum buffers now exist and are non-zero
    before = _snapshot(trainer)
    result = trainer.step(*_nan_images(images, targets))
    assert result.skipped
    assert trainer.steps == 2 and trainer.skipped_steps == 1
    _assert_same_state(trainer, before)  # BatchNorm statistics restored too
    assert all(p.grad is None for p in trainer.model.parameters())
    assert not trainer.step(images, targets).skipped
    assert trainer.steps == 3


def test_non_finite_gradient_is_skipped_and_changes_nothing():
    images, targets = _batch(2)
    trainer = _trainer(TrainConfig(lr=0.01, clip_grad_norm=1.0))
    trainer.step(images, targets)
    before = _snapshot(trainer)
    handle = _inf_gradient(trainer)
    result = trainer.step(images, targets)
    handle.remove()
    assert result.skipped and torch.isfinite(torch.tensor(result.loss_l + result.loss_c))
    assert (trainer.steps, trainer.skipped_steps) == (1, 1)
    _assert_same_state(trainer, before)


def test_invalid_targets_raise_and_change_nothing():
    images, targets = _batch(2)
    trainer = _trainer()
    trainer.step(images, targets)
    before = _snapshot(trainer)
    bad = [t.clone() for t in targets]
    bad[0][0, :4] = torch.tensor([0.9, 0.9, 0.1, 0.1])  # x2 < x1
    with pytest.raises(ValueError):
        trainer.step(images, bad)
    _assert_same_state(trainer, before)
    assert (trainer.steps, trainer.skipped_steps) == (1, 0)


def test_clipping_matches_a_hand_computed_sgd_step():
    images, targets = _batch(2)
    config = TrainConfig(lr=0.1, clip_grad_norm=0.5, weight_decay=5e-4)
    trainer = _trainer(config)
    reference = copy.deepcopy(trainer.model)
    trainer.step(images, targets)

    # slow reference: loss, backward, clip, then p <- p - lr * (g + wd * p) (first step: no momentum yet)
    loc, conf, priors = reference(images)
    output = _criterion().compute((loc, conf, priors), targets)
    (output.loss_l + output.loss_c).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    assert norm > 0.5  # the clip is active
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * (p.grad + 5e-4 * p)
    for (name, got), want in zip(
        trainer.model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_amp_flag_is_ignored_on_cpu():
    images, targets = _batch(2)
    plain, amp = _trainer(), _trainer(TrainConfig(lr=0.01, amp=True))
    a, b = plain.step(images, targets), amp.step(images, targets)
    assert (a.loss_l, a.loss_c) == (b.loss_l, b.loss_c)
    _assert_tensors_equal(plain.model.state_dict(), amp.model.state_dict())


def test_weights_are_a_detached_copy():
    trainer = _trainer()
    weights = trainer.weights()
    _assert_tensors_equal(weights, trainer.model.state_dict())
    images, targets = _batch(2)
    trainer.step(images, targets)
    assert not torch.equal(weights["loc.0.weight"], trainer.model.state_dict()["loc.0.weight"])
    assert all(not t.requires_grad and t.device.type == "cpu" for t in weights.values())


def test_recovers_from_truncated_newest_checkpoint(tmp_path):
    images, targets = _batch(2)
    store = CheckpointStore(tmp_path)
    trainer = _trainer(TrainConfig(lr=0.01, warmup_steps=3))
    for version in (1, 2):
        trainer.step(images, targets)
        state = trainer.state()
        store.save(state.weights, {"version": version, "step": trainer.steps}, state.optimizer_state)
        if version == 1:
            uninterrupted = copy.deepcopy(trainer)
    weights = tmp_path / "ckpt-00000002.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # crash mid-write of the newest weights

    resumed = _trainer(TrainConfig(lr=0.01, warmup_steps=3), seed=7)
    state_dict, meta, optimizer_state, _ = CheckpointStore(tmp_path).load_latest()
    assert meta["version"] == 1
    resumed.restore(state_dict, optimizer_state, meta["step"])
    for _ in range(2):
        a, b = uninterrupted.step(images, targets), resumed.step(images, targets)
        assert (a.loss_l, a.loss_c, a.lr) == (b.loss_l, b.loss_c, b.lr)
    assert resumed.steps == uninterrupted.steps == 3
    _assert_same_state(resumed, _snapshot(uninterrupted))


def test_all_finite_hook_decides_the_skip_and_sees_the_local_verdict():
    """A finite step vetoed by `all_finite` (as another rank's NaN would) changes nothing."""
    images, targets = _batch(2)
    verdicts = []
    veto = True

    def all_finite(flag: torch.Tensor) -> bool:
        verdicts.append(bool(flag))
        return bool(flag) and not veto

    trainer = Trainer(_model(), _criterion(), TrainConfig(lr=0.01), "cpu", all_finite=all_finite)
    before = _snapshot(trainer)
    assert trainer.step(images, targets).skipped
    _assert_same_state(trainer, before)
    veto = False
    assert not trainer.step(images, targets).skipped
    assert verdicts == [True, True] and (trainer.steps, trainer.skipped_steps) == (1, 1)


def test_module_hook_keys_weights_state_and_restore_by_the_wrapped_network():
    class Wrapper(torch.nn.Module):  # prefixes every key with `inner.`, like DDP's `module.`
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner(images)

    network = _model()
    trainer = Trainer(Wrapper(network), _criterion(), TrainConfig(lr=0.01), "cpu", module=network)
    images, targets = _batch(2)
    trainer.step(images, targets)
    plain = network.state_dict()
    _assert_tensors_equal(trainer.weights(), plain)
    _assert_tensors_equal(trainer.state()[0], plain)
    assert all(key.startswith("inner.") for key in trainer.model.state_dict())
    fresh = _model(seed=1).state_dict()
    trainer.restore(fresh, None, steps=7)
    _assert_tensors_equal(network.state_dict(), fresh)
    assert trainer.steps == 7
