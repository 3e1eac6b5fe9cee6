"""The served model's loss on labelled images: through the batcher (`served_loss_batched`) the same figure as
the host called directly (`served_loss`), the images counted under the route."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from app.core.metrics import Metrics
from app.serving.inference import InferenceWorker, batch_policy
from app.serving.model_host import ModelHost, initial_model
from app.serving.served_loss import loss_inputs, served_loss, served_loss_batched
from ssd_core.loss.multibox import MultiBoxLoss
from tests.app.conftest import make_settings


async def never_gone() -> None:
    await asyncio.Event().wait()


def test_batched_scoring_equals_the_direct_one_and_counts_the_images(tmp_path, shapes):
    settings = make_settings(tmp_path, max_batch_delay_ms=0)
    metrics = Metrics(CollectorRegistry())
    model, _ = initial_model(settings, None)
    host = ModelHost(settings, metrics, model, 0, 0)
    inference = InferenceWorker(host, batch_policy(settings), metrics)
    criterion = MultiBoxLoss(settings.num_classes, 0.5, True, 0, True, 3, 0.5, False)
    samples = [shapes[0], shapes[1]]
    try:
        images, targets, class_mask = loss_inputs(samples, host.spec, criterion)
        batched, served = asyncio.run(served_loss_batched(
            never_gone, images, targets, class_mask, criterion, "/score-loss", host, inference, metrics))
    finally:
        inference.stop(5)
    direct, direct_served = served_loss(samples, host, criterion)
    assert served is direct_served is host.current
    assert float(batched.loss_l) == pytest.approx(float(direct.loss_l), rel=1e-5)
    assert float(batched.loss_c) == pytest.approx(float(direct.loss_c), rel=1e-5)
    assert metrics.registry.get_sample_value("ssd_images_processed_total", {"route": "/score-loss"}) == 2
