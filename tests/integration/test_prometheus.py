"""A real Prometheus server (Debian's `prometheus`) scrapes the live service every second.

The test fills the validation set, then drives score, fine-tune (gated) and detect traffic (plus one
rejected request and a checkpoint) in two phases separated by a scrape, so every rate() in the dashboard has an increase inside its window. Then:
Prometheus's query API returns the loss and match series with the values the service's own responses
imply, and every PromQL expression of the Grafana dashboard is accepted and returns finite data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.live import (
    LivePrometheus,
    LiveService,
    dashboard_expressions,
    grafana_to_promql,
    labelled_images,
    require_tool,
    run_prometheus,
)

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("integration-prometheus")]

FINETUNE_STEPS = (2, 1)  # steps of the job in each phase
VALIDATION_IMAGES = 3  # the live service's gate judges from 2
LEARNING_RATE = 1e-3


class Traffic:
    """Sends requests and keeps the totals the metrics must show."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.score_responses: list[dict] = []
        self.score_boxes = 0
        self.score_images = 0
        self.finetune_jobs: list[dict] = []
        self.finetune_boxes_per_step: list[int] = []
        self.detect_images = 0
        self.protocol_images = 0
        self.rejected = 0

    def score(self, images: list[dict]) -> None:
        response = self.client.post("/score-loss", json={"images": images})
        assert response.status_code == 200, response.text
        self.score_responses.append(response.json())
        self.score_boxes += sum(len(image["boxes"]) for image in images)
        self.score_images += len(images)

    def finetune(self, images: list[dict], steps: int) -> None:
        # replay 0: every box a step trains on is one this client sent (the counters are checked against them)
        body = {"images": images, "steps": steps, "learning_rate": LEARNING_RATE, "replay": 0}
        response = self.client.post("/finetune", params={"wait": "true"}, json=body)
        assert response.status_code == 200, response.text
        job = response.json()
        assert (job["steps_done"], job["skipped_steps"]) == (steps, 0), job
        assert job["status"] in ("succeeded", "rejected") and job["evaluation"]["decision"] != "ungated", job
        self.finetune_jobs.append(job)
        self.finetune_boxes_per_step += [sum(len(image["boxes"]) for image in images)] * steps

    def detect(self, images: list[dict]) -> None:
        response = self.client.post("/detect", json={"images": [{"image": image["image"]} for image in images]})
        assert response.status_code == 200, response.text
        self.detect_images += len(images)

    def protocol_infer(self, images: list[dict]) -> None:
        """The same images through the Open Inference Protocol (encoded PNGs as BYTES, base64 in JSON)."""
        body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)],
                            "data": [image["image"] for image in images]}]}
        response = self.client.post("/v2/models/ssd/infer", json=body)
        assert response.status_code == 200, response.text
        self.protocol_images += len(images)

    def reject(self) -> None:
        """One bad request (an empty batch): a 4xx for the error panels."""
        response = self.client.post("/score-loss", json={"images": []})
        assert 400 <= response.status_code < 500, response.text
        self.rejected += 1

    def phase(self, seed: int, finetune_steps: int) -> None:
        # one image of tiny objects that no prior overlaps enough: forced matches
        self.score(labelled_images(1, seed=seed) + labelled_images(1, seed=seed + 50, min_size=0.04, max_size=0.06))
        self.finetune(labelled_images(2, seed=seed + 1), finetune_steps)
        self.detect(labelled_images(2, seed=seed + 2))
        self.protocol_infer(labelled_images(1, seed=seed + 3))
        self.reject()


def value(prometheus: LivePrometheus, expr: str) -> float:
    """The single sample an instant query returns."""
    result = prometheus.query(expr)
    assert len(result) == 1, f"{expr}: expected one series, got {result}"
    return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    """Skips before the service starts when Prometheus is not installed."""
    return require_tool("prometheus")


@pytest.fixture(scope="module")
def scraped(
    prometheus_binary: str, live_service: LiveService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LivePrometheus, Traffic]]:
    """Prometheus scraping the service after two phases of traffic (once for the module's tests)."""
    with run_prometheus(tmp_path_factory.mktemp("prometheus"), live_service.host_port) as prometheus, httpx.Client(
        base_url=live_service.url, timeout=180
    ) as client:
        prometheus.wait_for_scrape_after(time.time(), timeout_s=60)
        validation = client.post("/validation", json={"images": labelled_images(VALIDATION_IMAGES, seed=300)})
        assert validation.status_code == 200, validation.text
        traffic = Traffic(client)
        traffic.phase(seed=100, finetune_steps=FINETUNE_STEPS[0])
        checkpoint = client.post("/model/checkpoint")
        assert checkpoint.status_code == 200, checkpoint.text
        prometheus.wait_for_scrape_after(time.time())
        traffic.phase(seed=200, finetune_steps=FINETUNE_STEPS[1])
        prometheus.wait_for_scrape_after(time.time())
        yield prometheus, traffic


def test_prometheus_holds_loss_and_match_series_matching_the_responses(scraped):
    prometheus, traffic = scraped
    per_image = [image for response in traffic.score_responses for image in response["per_image"]]
    assert len(per_image) == traffic.score_images == 4

    def score(name: str, extra_labels: str = "") -> float:
        return value(prometheus, f'{name}{{job="ssd",source="score"{extra_labels}}}')

    assert score("ssd_ground_truth_boxes_total") == traffic.score_boxes
    assert score("ssd_ground_truth_boxes_total") == sum(image["num_ground_truth"] for image in per_image)
    forced = sum(image["num_forced_matches"] for image in per_image)
    assert forced > 0, "the tiny objects should have needed forced matches"
    assert score("ssd_forced_matches_total") == forced
    assert score("ssd_positives_per_image_count") == traffic.score_images
    assert score("ssd_positives_per_image_sum") == sum(image["num_positives"] for image in per_image)
    assert score("ssd_hard_negatives_per_image_sum") == sum(image["num_negatives"] for image in per_image)
    assert score("ssd_matched_iou_count") == sum(image["num_positives"] for image in per_image)
    matched_iou_sum = sum(image["mean_matched_iou"] * image["num_positives"] for image in per_image)
    assert score("ssd_matched_iou_sum") == pytest.approx(matched_iou_sum, rel=1e-4, abs=1e-4)
    assert score("ssd_loss_loc_count") == score("ssd_loss_conf_count") == len(traffic.score_responses)
    assert score("ssd_loss_loc_sum") == pytest.approx(sum(r["loss_l"] for r in traffic.score_responses), rel=1e-5)
    assert score("ssd_loss_conf_sum") == pytest.approx(sum(r["loss_c"] for r in traffic.score_responses), rel=1e-5)
    # every IoU lies in (0, 1]: the +Inf bucket holds nothing beyond the le="1.0" bucket
    assert score("ssd_matched_iou_bucket", ',le="1.0"') == score("ssd_matched_iou_count")


def test_prometheus_holds_per_class_series_matching_the_responses(scraped):
    prometheus, traffic = scraped
    rows = [row for response in traffic.score_responses for row in response["per_class"]]
    names = sorted({row["class_name"] for row in rows})
    assert len(names) == 3  # ssd-small's object classes (named class_<label> without SSD_CLASS_NAMES)
    fields = {"ssd_class_ground_truth_boxes_total": "num_ground_truth", "ssd_class_positives_total": "num_positives",
              "ssd_class_forced_matches_total": "num_forced_matches"}
    for name in names:
        mine = [row for row in rows if row["class_name"] == name]
        for metric, field in fields.items():
            got = value(prometheus, f'{metric}{{job="ssd",source="score",class="{name}"}}')
            assert got == sum(row[field] for row in mine), (metric, name)
        iou = value(prometheus, f'ssd_class_matched_iou_total{{job="ssd",source="score",class="{name}"}}')
        assert iou == pytest.approx(sum(row["mean_matched_iou"] * row["num_positives"] for row in mine), rel=1e-4,
                                    abs=1e-4)
    total = value(prometheus, 'sum(ssd_class_ground_truth_boxes_total{job="ssd",source="finetune"})')
    assert total == sum(traffic.finetune_boxes_per_step)
    # the job views pool per_class over their steps: their boxes add up to the same total
    assert total == sum(row["num_ground_truth"] for job in traffic.finetune_jobs for row in job["per_class"])


def test_prometheus_holds_finetune_series_matching_the_jobs(scraped):
    prometheus, traffic = scraped
    steps = sum(FINETUNE_STEPS)
    last_job = traffic.finetune_jobs[-1]
    last_step = last_job["losses"][-1]
    assert value(prometheus, "ssd_finetune_steps_total") == steps
    assert value(prometheus, "ssd_finetune_skipped_steps_total") == 0
    assert value(prometheus, 'ssd_finetune_jobs_total{state="succeeded"}') == len(FINETUNE_STEPS)
    assert value(prometheus, 'ssd_finetune_jobs_total{state="failed"}') == 0
    assert value(prometheus, "ssd_finetune_queue_depth") == 0
    assert value(prometheus, "ssd_model_version") == max(job["model_version"] for job in traffic.finetune_jobs)
    assert value(prometheus, "ssd_learning_rate") == pytest.approx(last_step["learning_rate"], rel=1e-9)
    assert value(prometheus, 'ssd_loss_loc_count{source="finetune"}') == steps
    losses_l = [step["loss_l"] for job in traffic.finetune_jobs for step in job["losses"]]
    assert value(prometheus, 'ssd_loss_loc_sum{source="finetune"}') == pytest.approx(sum(losses_l), rel=1e-5)
    boxes = value(prometheus, 'ssd_ground_truth_boxes_total{source="finetune"}')
    assert boxes == sum(traffic.finetune_boxes_per_step)
    assert value(prometheus, 'ssd_checkpoints_total{outcome="saved"}') >= 1
    assert value(prometheus, 'ssd_model_info{architecture="ssd-small",num_classes="4",device="cpu",backend="torch"}') == 1


def test_prometheus_holds_validation_and_gate_series_matching_the_jobs(scraped):
    prometheus, traffic = scraped
    jobs = traffic.finetune_jobs
    decisions = [job["evaluation"]["decision"] for job in jobs]
    for decision in ("published", "rejected", "ungated"):
        assert value(prometheus, f'ssd_gate_decisions_total{{decision="{decision}"}}') == decisions.count(decision)
    assert value(prometheus, 'ssd_finetune_jobs_total{state="rejected"}') == decisions.count("rejected")
    assert value(prometheus, "ssd_screening_rejections_total") == 0  # a model not yet competent: quiet
    assert value(prometheus, "ssd_validation_images") == VALIDATION_IMAGES
    assert value(prometheus, "ssd_evaluation_seconds_count") == len(jobs)
    seconds = sum(job["evaluation"]["seconds"] for job in jobs)
    assert value(prometheus, "ssd_evaluation_seconds_sum") == pytest.approx(seconds, rel=0.2, abs=0.5)
    # the gauges: the served version's figures of the last evaluation (a published candidate's own)
    last = jobs[-1]["evaluation"]
    served = last["candidate"] if last["decision"] == "published" else last["served"]
    assert value(prometheus, "ssd_validation_map_50") == pytest.approx(served["map_50"], abs=1e-6)
    assert value(prometheus, "ssd_validation_loss") == pytest.approx(served["loss"], rel=1e-5)
    per_class = prometheus.query("ssd_validation_ap_50")
    assert per_class and all(series["metric"]["class"].startswith("class_") for series in per_class)
    assert all(0 <= float(series["value"][1]) <= 1 for series in per_class)


def test_prometheus_holds_request_series(scraped):
    prometheus, traffic = scraped
    assert value(prometheus, 'ssd_http_requests_total{route="/score-loss",method="POST",status="200"}') == 2
    rejected = prometheus.query('sum(ssd_http_requests_total{route="/score-loss",status=~"4.."})')
    assert float(rejected[0]["value"][1]) == traffic.rejected
    assert value(prometheus, 'ssd_http_request_duration_seconds_count{route="/detect",method="POST"}') == 2
    assert value(prometheus, 'ssd_images_processed_total{route="/detect"}') == traffic.detect_images
    assert value(prometheus, 'ssd_images_processed_total{route="/score-loss"}') == traffic.score_images
    assert prometheus.query('ssd_http_requests_total{status=~"5.."}') == []
    assert value(prometheus, 'sum(ssd_http_requests_in_progress{route="/detect"})') == 0


def test_prometheus_holds_inference_batching_series(scraped):
    """The traffic is sequential: every request is one forward pass of its own images."""
    prometheus, traffic = scraped
    per_route = {"/detect": (2, traffic.detect_images), "/score-loss": (2, traffic.score_images),
                 "/v2/models/ssd/infer": (2, traffic.protocol_images)}
    for route, (forwards, images) in per_route.items():
        labels = f'{{route="{route}"}}'
        assert value(prometheus, f"ssd_inference_batch_size_count{labels}") == forwards, route
        assert value(prometheus, f"ssd_inference_batch_size_sum{labels}") == images, route
        assert value(prometheus, f"ssd_inference_queue_wait_seconds_count{labels}") == forwards, route
        assert value(prometheus, f"ssd_inference_compute_seconds_count{labels}") == forwards, route
        assert value(prometheus, f"ssd_inference_compute_seconds_sum{labels}") > 0, route
        assert value(prometheus, f"ssd_inference_cancelled_images_total{labels}") == 0, route
    assert value(prometheus, 'ssd_images_processed_total{route="/v2/models/ssd/infer"}') == traffic.protocol_images
    assert value(prometheus, "ssd_inference_queued_images") == 0
    # a request alone finds the inference thread idle and runs at once: far below 0.25 s even on a loaded machine
    assert value(prometheus, 'sum(ssd_inference_queue_wait_seconds_bucket{le="0.25"})') == 6


# series the service exposes only once it holds a validation set (the per-class validation gauge; this live service has
# none): their panels' expressions must be accepted by Prometheus, and may return no data
ONLY_WITH_A_VALIDATION_SET = ("ssd_validation_ap_50",)


def test_every_dashboard_expression_is_accepted_and_returns_finite_data(scraped):
    prometheus, _ = scraped
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    for title, expr in expressions:
        result = prometheus.query(grafana_to_promql(expr))
        if not result and any(name in expr for name in ONLY_WITH_A_VALIDATION_SET):
            continue
        assert result, f"panel {title!r}: {expr!r} returned no data"
        values = [float(series["value"][1]) for series in result]
        assert any(math.isfinite(v) for v in values), f"panel {title!r}: {expr!r} gave only {values}"
