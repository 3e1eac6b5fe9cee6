"""schemathesis (PyPI) fuzzes the live service from its own OpenAPI schema: no 5xx, no response that
breaks the schema. Bounded: a fixed number of examples per operation and a seed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.live import LiveService, run_service

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("integration-schemathesis")]

MAX_EXAMPLES = 25  # per operation
RUN_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def small_limits_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """The service with small limits, so that generated fine-tune jobs and images stay cheap."""
    limits = {
        "SSD_FINETUNE_MAX_STEPS": "2",
        "SSD_FINETUNE_QUEUE_SIZE": "2",
        "SSD_MAX_IMAGES_PER_REQUEST": "2",
        "SSD_MAX_IMAGE_PIXELS": str(256 * 256),
        "SSD_MAX_BODY_BYTES": str(1 << 20),
    }
    with run_service(tmp_path_factory.mktemp("schemathesis-service"), **limits) as service:
        yield service


def schemathesis_command() -> list[str]:
    """The schemathesis CLI of this interpreter's environment."""
    script = Path(sys.executable).with_name("schemathesis")
    if script.exists():
        return [str(script)]
    found = shutil.which("schemathesis")
    if found is None:
        pytest.skip("schemathesis is not installed; `pip install -e '.[test]'` installs it")
    return [found]


def test_schemathesis_finds_no_server_error_and_no_schema_violation(small_limits_service, tmp_path):
    command = [
        *schemathesis_command(), "run", f"{small_limits_service.url}/openapi.json",
        "--checks", "not_a_server_error,response_schema_conformance",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "20261130",
        "--workers", "1",
        "--request-timeout", "60",
        "--no-shrink",
        "--report", "junit",
        "--report-dir", str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    # it really exercised the API: every documented operation was tested
    junit = next(tmp_path.glob("**/*.xml")).read_text()
    for operation in ("POST /score-loss", "POST /finetune", "POST /detect", "GET /model"):
        assert operation in junit, f"{operation} not tested:\n{output[-4000:]}"
