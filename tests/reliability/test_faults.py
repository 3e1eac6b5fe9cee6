"""Faults: a step that wrecks the weights, a failing disk, SIGTERM during a job, kill -9 during
checkpoint writes. Nothing acknowledged is lost, nothing partial is loaded, the served model keeps
answering.

The live-server cases run `python -m app` (the production entry) through the integration harness,
each with its own checkpoint directory, and always stop what they start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from ssd_core.checkpoint import CheckpointStore
from ssd_core.datasets import collate
from ssd_core.loss import MultiBoxLoss
from ssd_core.models import build_model
from ssd_core.synthetic import ShapesDataset
from ssd_core.training import TrainConfig, Trainer
from tests.app.conftest import labelled, make_settings, start_client
from tests.integration.live import labelled_images, run_service
from tests.reliability.conftest import checkpoint_digests, complete_checkpoints, scrape

SHAPES = ShapesDataset(4, image_size=64, seed=3)
WRECKING_LR = 1e30  # finite loss and gradients, but the updated weights make the predictions overflow
SIGTERM_EXIT_BOUND_S = 15.0


# ---- a step that would wreck the weights


def test_trainer_verify_update_undoes_a_wrecking_step_bitwise():
    torch.manual_seed(0)
    model = build_model("ssd-small", 4)
    images, targets = collate([SHAPES[0], SHAPES[1]], model.spec)  # [2, 3, S, S], list[[n, 6]]
    criterion = MultiBoxLoss(4, 0.5, True, 0, True, 3, 0.5, False)
    trainer = Trainer(model, criterion, TrainConfig(lr=1e-3, verify_update=True), "cpu")
    assert not trainer.step(images, targets).skipped  # an ordinary step: momentum buffers now exist
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = {i: s["momentum_buffer"].clone() for i, s in enumerate(trainer.optimizer.state.values())}

    result = trainer.step(images, targets, lr=WRECKING_LR)

    assert result.skipped and (trainer.steps, trainer.skipped_steps) == (1, 1)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # BatchNorm buffers too
    assert all(torch.equal(momentum[i], s["momentum_buffer"]) for i, s in enumerate(trainer.optimizer.state.values()))
    assert not trainer.step(images, targets).skipped  # still trainable


def test_trainer_without_verify_update_lets_the_wrecking_step_through():
    """The reference behaviour the service must not have: the update is applied, the model is ruined."""
    torch.manual_seed(0)
    model = build_model("ssd-small", 4)
    images, targets = collate([SHAPES[0], SHAPES[1]], model.spec)
    trainer = Trainer(model, MultiBoxLoss(4, 0.5, True, 0, True, 3, 0.5, False), TrainConfig(lr=1e-3), "cpu")
    assert not trainer.step(images, targets, lr=WRECKING_LR).skipped
    assert trainer.step(images, targets).skipped  # every later step is non-finite


def test_extreme_learning_rate_is_skipped_and_the_served_model_is_untouched(tmp_path):
    items = labelled(SHAPES)
    with start_client(make_settings(tmp_path)) as client:
        assert client.post("/finetune?wait=true", json={"images": items, "steps": 1}).json()["status"] == "succeeded"
        detect = {"images": [{"image": items[0]["image"]}], "score_threshold": 0.01}
        before_detect, before_loss = client.post("/detect", json=detect).json(), client.post(
            "/score-loss", json={"images": items}).json()
        checkpoints = checkpoint_digests(tmp_path / "checkpoints")
        skipped_before = client.sample("ssd_finetune_skipped_steps_total")

        job = client.post("/finetune?wait=true", json={"images": items, "steps": 2, "learning_rate": WRECKING_LR}).json()

        assert job["status"] == "failed" and "skipped" in job["error"], job
        assert job["skipped_steps"] == 2 and all(step["skipped"] for step in job["losses"])
        assert [step["model_version"] for step in job["losses"]] == [1, 1] and job["model_version"] == 1
        assert client.version == 1
        assert client.sample("ssd_finetune_skipped_steps_total") - skipped_before == 2
        assert client.sample("ssd_finetune_jobs_total", state="failed") == 1
        assert client.post("/detect", json=detect).json() == before_detect  # same weights, same answers
        assert client.post("/score-loss", json={"images": items}).json() == before_loss
        assert checkpoint_digests(tmp_path / "checkpoints") == checkpoints  # nothing new to save
        after = client.post("/finetune?wait=true", json={"images": items, "steps": 1}).json()
        assert after["status"] == "succeeded" and after["model_version"] == 2  # the model still trains
