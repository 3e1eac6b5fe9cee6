"""Fixtures for the integration tests: a live service process per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.live import LiveService, run_service


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """The real service (uvicorn, ssd-small, 4 classes, CPU) on a free loopback port, stopped afterwards."""
    # the gated default with a gate that judges from 2 validation images, every job image trained on
    with run_service(tmp_path_factory.mktemp("service"), SSD_GATE_MIN_IMAGES="2", SSD_HOLDOUT_FRACTION="0") as service:
        yield service
