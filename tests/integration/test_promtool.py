"""`promtool check metrics` (Debian's prometheus package) finds no problem in the live /metrics output."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from tests.integration.live import LiveService, labelled_images, require_tool

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("integration-promtool")]


@pytest.fixture(scope="module")
def promtool() -> str:
    """Skips before the service starts when promtool is not installed."""
    return require_tool("promtool")


def test_promtool_check_metrics_reports_nothing_on_live_metrics(promtool: str, live_service: LiveService):
    # one scored batch and one detection so that labelled histograms and counters are exposed too
    with httpx.Client(base_url=live_service.url, timeout=120) as client:
        assert client.post("/score-loss", json={"images": labelled_images(2, seed=11)}).status_code == 200
        detect = client.post("/detect", json={"images": [{"image": labelled_images(1, seed=12)[0]["image"]}]})
        assert detect.status_code == 200
        metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for family in ("ssd_loss_loc_bucket{", "ssd_matched_iou_bucket{", "ssd_http_request_duration_seconds_bucket{"):
        assert family in text, f"{family} not exposed, the check would prove little"

    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")

    # the same check does catch a problem (so an empty report means something)
    broken = text + "# HELP ssd_bad_metric Oops.\n# TYPE ssd_bad_metric counter\nssd_bad_metric 1\n"
    result = subprocess.run([promtool, "check", "metrics"], input=broken, capture_output=True, text=True, timeout=60)
    assert "ssd_bad_metric" in result.stdout + result.stderr
