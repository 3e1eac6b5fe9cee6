"""ModelEMA and the Trainer's EMA: the ramp, BatchNorm buffers, a hand-computed average over real
training steps, skipped steps, and resuming both weight sets from a checkpoint."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ssd_core.storage.checkpoint import CheckpointStore
from ssd_core.training.ema import EMAConfig, ModelEMA
from ssd_core.training.trainer import TrainConfig
from tests.ssd_core.training.test_trainer import _assert_tensors_equal, _batch, _inf_gradient, _trainer


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _hand_average(average: dict, raw: dict, decay: float) -> dict:
    """The EMA rule element by element: floats averaged, integers copied."""
    result = {}
    for name, value in average.items():
        if value.dtype.is_floating_point:
            result[name] = decay * value + (1 - decay) * raw[name]
        else:
            result[name] = raw[name].clone()
    return result


def test_decay_ramp_follows_ultralytics_formula():
    config = EMAConfig(decay=0.99, tau=10)
    assert config.decay_at(1) == pytest.approx(0.99 * (1 - math.exp(-0.1)))
    assert config.decay_at(30) == pytest.approx(0.99 * (1 - math.exp(-3)))
    assert config.decay_at(10_000) == pytest.approx(0.99)
    assert not EMAConfig().enabled


@pytest.mark.parametrize("field,value", [("decay", -0.1), ("decay", 1.0), ("tau", 0.0)])
def test_bad_ema_config_is_a_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        EMAConfig(**{"decay": 0.9, field: value})


def test_update_averages_floats_and_batchnorm_statistics_and_copies_integers():
    model = _net(0)
    ema = ModelEMA(model, EMAConfig(decay=0.9, tau=2))
    expected = copy.deepcopy(ema.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for update in range(1, 5):
        model.train()
        optimizer.zero_grad()
        model(torch.randn(8, 3, generator=generator)).square().mean().backward()  # also moves BN statistics
        optimizer.step()
        decay = ema.update(model)
        assert decay == pytest.approx(0.9 * (1 - math.exp(-update / 2)))
        expected = _hand_average(expected, model.state_dict(), decay)
        for name, value in ema.state_dict().items():
            torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=name)
    assert int(ema.state_dict()["1.num_batches_tracked"]) == 4  # copied, not averaged
    assert not torch.equal(ema.state_dict()["1.running_mean"], model.state_dict()["1.running_mean"])
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_published_weights_are_the_hand_computed_ema_of_the_training_steps():
    images, targets = _batch(2)
    trainer = _trainer(TrainConfig(lr=0.01, ema=EMAConfig(decay=0.8, tau=3)))
    expected = copy.deepcopy(trainer.module.state_dict())  # the average starts at the initial weights
    for step in range(1, 4):
        trainer.step(images, targets)
        expected = _hand_average(expected, trainer.module.state_dict(), 0.8 * (1 - math.exp(-step / 3)))
    published = trainer.weights()
    for name, value in published.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(published["loc.0.weight"], trainer.module.state_dict()["loc.0.weight"])
    assert trainer.published is trainer.ema.module
    state = trainer.state()
    _assert_tensors_equal(state.weights, trainer.ema.state_dict())
    _assert_tensors_equal(state.training_weights, trainer.module.state_dict())


def test_without_ema_the_published_model_is_the_trained_one():
    trainer = _trainer()
    trainer.step(*_batch(2))
    assert trainer.ema is None and trainer.published is trainer.module
    assert trainer.state().training_weights is None


def test_a_skipped_step_leaves_the_ema_untouched():
    images, targets = _batch(2)
    trainer = _trainer(TrainConfig(lr=0.01, ema=EMAConfig(decay=0.9, tau=1)))
    trainer.step(images, targets)
    before = copy.deepcopy(trainer.ema.state_dict())
    handle = _inf_gradient(trainer)
    assert trainer.step(images, targets).skipped
    handle.remove()
    _assert_tensors_equal(trainer.ema.state_dict(), before)
    assert trainer.ema.updates == trainer.steps == 1


def test_a_restart_resumes_the_ema_and_the_raw_weights(tmp_path):
    images, targets = _batch(2)
    config = TrainConfig(lr=0.01, ema=EMAConfig(decay=0.9, tau=2))
    uninterrupted = _trainer(config)
    for _ in range(2):
        uninterrupted.step(images, targets)
    state = uninterrupted.state()
    store = CheckpointStore(tmp_path)
    store.save(state.weights, {"version": 1, "step": uninterrupted.steps}, state.optimizer_state,
               state.training_weights)

    resumed = _trainer(config, seed=7)  # different init: everything must come from the checkpoint
    loaded = store.load_latest()
    resumed.restore(loaded.state_dict, loaded.optimizer_state, loaded.meta["step"], loaded.training_weights)
    for _ in range(2):
        a, b = uninterrupted.step(images, targets), resumed.step(images, targets)
        assert (a.loss_l, a.loss_c) == (b.loss_l, b.loss_c)
    _assert_tensors_equal(resumed.module.state_dict(), uninterrupted.module.state_dict())
    _assert_tensors_equal(resumed.weights(), uninterrupted.weights())
    assert resumed.ema.updates == uninterrupted.ema.updates == 4


def test_turning_the_ema_on_or_off_resumes_from_the_served_weights(tmp_path):
    """EMA off: the trainer continues from the published weights, never from stale raw ones;
    EMA newly on: the average starts at the checkpoint's weights."""
    with_ema = _trainer(TrainConfig(lr=0.01, ema=EMAConfig(decay=0.9, tau=1)))
    with_ema.step(*_batch(2))
    state = with_ema.state()
    plain = _trainer(seed=3)
    plain.restore(state.weights, None, 1, state.training_weights)
    _assert_tensors_equal(plain.weights(), with_ema.weights())

    newly_on = _trainer(TrainConfig(lr=0.01, ema=EMAConfig(decay=0.9, tau=1)), seed=4)
    newly_on.restore(plain.state().weights, None, 1)
    _assert_tensors_equal(newly_on.weights(), newly_on.module.state_dict())
    _assert_tensors_equal(newly_on.weights(), with_ema.weights())


def test_an_sgd_checkpoint_resumes_under_adamw_with_a_fresh_optimizer():
    images, targets = _batch(2)
    sgd = _trainer()
    sgd.step(images, targets)
    state = sgd.state()
    adamw = _trainer(TrainConfig(lr=1e-3, optimizer="adamw"), seed=5)
    adamw.restore(state.weights, state.optimizer_state, sgd.steps)
    _assert_tensors_equal(adamw.module.state_dict(), sgd.module.state_dict())
    assert adamw.optimizer.state_dict()["state"] == {}  # not SGD's momentum buffers
    assert not adamw.step(images, targets).skipped
    same = _trainer(seed=6)
    same.restore(state.weights, state.optimizer_state, sgd.steps)
    assert same.optimizer.state_dict()["state"].keys() == state.optimizer_state["state"].keys()
