"""app.core.metrics: the names in docs/ARCHITECTURE.md, record_match_stats against a loss computed here,
and request metrics labelled by route template."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from app.core.metrics import IOU_BUCKETS, Metrics, record_match_stats
from ssd_core import VOC_300, MultiBoxLoss, prior_boxes

ARCHITECTURE = Path(__file__).resolve().parents[3] / "docs" / "ARCHITECTURE.md"


def contract() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) from the metric table of docs/ARCHITECTURE.md."""
    table = ARCHITECTURE.read_text().split("### Prometheus metric names", 1)[1]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`ssd_"):
            labels = set(re.findall(r"`(\w+)`", cells[2].split("(")[0])) if cells[2] else set()
            rows[cells[0].strip("`")] = (cells[1], labels)
    return rows


def exposed(metrics: Metrics) -> dict:
    families = {}
    for family in metrics.registry.collect():
        families[family.name] = family
    return families


def test_every_contract_metric_exists_with_its_type_and_labels():
    metrics = Metrics(CollectorRegistry())
    metrics.build.info({"version": "1", "torch": "2"})
    metrics.model.info({"architecture": "ssd300", "num_classes": "21", "device": "cpu"})
    table = contract()
    assert len(table) >= 20  # the parser found the table
    families = exposed(metrics)
    documented = {name.removesuffix("_total") for name in table}
    assert set(families) == documented  # nothing undocumented, nothing missing
    for name, (kind, labels) in table.items():
        family_name = name.removesuffix("_total")
        assert family_name in families, name
        assert families[family_name].type == kind, name
        if kind == "info":
            continue
        collector = next(c for c in metrics.__dict__.values() if getattr(c, "_name", None) == family_name)
        assert set(collector._labelnames) == labels, name


def test_record_match_stats_against_the_loss():
    priors = prior_boxes(VOC_300)  # [8732, 4]
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(3, priors.shape[0], 4, generator=g)
    conf = torch.randn(3, priors.shape[0], 5, generator=g)
    targets = [torch.tensor([[0.1, 0.1, 0.5, 0.6, 0.0], [0.4, 0.3, 0.9, 0.9, 3.0]]),
               torch.tensor([[0.2, 0.2, 0.3, 0.25, 1.0]]), torch.zeros(0, 5)]
    output = MultiBoxLoss.ssd_pytorch(5).compute((loc, conf, priors), targets)
    metrics = Metrics(CollectorRegistry())
    record_match_stats(metrics, "score", output)
    record_match_stats(metrics, "score", output)
    value = metrics.registry.get_sample_value
    score = {"source": "score"}
    assert value("ssd_loss_loc_count", score) == 2
    assert value("ssd_loss_loc_sum", score) == pytest.approx(2 * float(output.loss_l))
    assert value("ssd_loss_conf_sum", score) == pytest.approx(2 * float(output.loss_c))
    assert value("ssd_positives_per_image_count", score) == 6
    assert value("ssd_positives_per_image_sum", score) == 2 * int(output.stats.num_positives.sum())
    assert value("ssd_positives_per_image_bucket", {**score, "le": "0.0"}) == 2  # the image without boxes
    assert value("ssd_hard_negatives_per_image_sum", score) == 2 * int(output.stats.num_negatives.sum())
    ious = output.stats.matched_ious
    assert value("ssd_matched_iou_count", score) == 2 * len(ious)
    for bound in IOU_BUCKETS:
        assert value("ssd_matched_iou_bucket", {**score, "le": str(bound)}) == 2 * int((ious <= bound).sum())
    assert value("ssd_ground_truth_boxes_total", score) == 6
    assert value("ssd_forced_matches_total", score) == 2 * int(output.stats.num_forced_matches.sum())
    assert value("ssd_loss_loc_count", {"source": "finetune"}) is None


def test_request_metrics_use_route_templates(client):
    client.get("/finetune/abc")
    client.get("/finetune/def")
    client.get("/no/such/path")
    client.request("PURGE", "/model")
    value = client.sample
    assert value("ssd_http_requests_total", route="/finetune/{job_id}", method="GET", status="404") == 2
    assert value("ssd_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value("ssd_http_requests_total", route="/model", method="other", status="405") == 1
    assert value("ssd_http_request_duration_seconds_count", route="/finetune/{job_id}", method="GET") == 2
    assert value("ssd_http_requests_in_progress", route="/finetune/{job_id}", method="GET") == 0
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(text.text)}
    assert {"ssd_http_requests", "ssd_model_version", "ssd_build_info", "ssd_model_info"} <= names
    assert value("ssd_build_info", version=client.app.version, torch=torch.__version__) == 1


CLASS_COUNTER_FIELDS = {
    "ssd_class_ground_truth_boxes_total": "num_ground_truth",
    "ssd_class_positives_total": "num_positives",
    "ssd_class_forced_matches_total": "num_forced_matches",
    "ssd_class_matched_iou_total": "matched_iou_sum",
    "ssd_class_loss_loc_total": "loss_l_sum",
    "ssd_class_loss_conf_total": "loss_c_sum",
}


def test_per_class_counters_after_known_batches():
    """Two batches' per-class sums, by class name and source; every class starts at zero."""
    names = ("cat", "dog", "bird", "fish")
    metrics = Metrics(CollectorRegistry(), names)
    value = metrics.registry.get_sample_value
    for name in CLASS_COUNTER_FIELDS:
        for class_name in names:
            for source in ("score", "finetune"):
                assert value(name, {"class": class_name, "source": source}) == 0, (name, class_name)
    priors = prior_boxes(VOC_300)  # [8732, 4]
    g = torch.Generator().manual_seed(1)
    outputs = []
    for targets in ([torch.tensor([[0.1, 0.1, 0.5, 0.6, 0.0], [0.4, 0.3, 0.9, 0.9, 3.0]]),
                     torch.tensor([[0.2, 0.2, 0.3, 0.25, 0.0]])],
                    [torch.tensor([[0.05, 0.5, 0.2, 0.6, 1.0]]), torch.tensor([[0.6, 0.1, 0.9, 0.7, 3.0]])]):
        loc, conf = torch.randn(2, len(priors), 4, generator=g), torch.randn(2, len(priors), 5, generator=g)
        outputs.append(MultiBoxLoss.ssd_pytorch(5).compute((loc, conf, priors), targets))
        record_match_stats(metrics, "score", outputs[-1])
    record_match_stats(metrics, "finetune", outputs[0])
    first, second = (output.stats.per_class for output in outputs)
    assert first.num_ground_truth.tolist() == [2, 0, 0, 1] and second.num_ground_truth.tolist() == [0, 1, 0, 1]
    for name, field in CLASS_COUNTER_FIELDS.items():
        for label, class_name in enumerate(names):
            expected = float(getattr(first, field)[label] + getattr(second, field)[label])
            assert value(name, {"class": class_name, "source": "score"}) == pytest.approx(expected, rel=1e-6)
            assert value(name, {"class": class_name, "source": "finetune"}) == pytest.approx(
                float(getattr(first, field)[label]), rel=1e-6)
    assert value("ssd_class_ground_truth_boxes_total", {"class": "fish", "source": "score"}) == 2
    assert value("ssd_class_positives_total", {"class": "bird", "source": "score"}) == 0  # no bird boxes
    # the class totals add up to the existing source totals, which keep their names
    for total, name in (("ssd_ground_truth_boxes_total", "ssd_class_ground_truth_boxes_total"),
                        ("ssd_forced_matches_total", "ssd_class_forced_matches_total")):
        assert sum(value(name, {"class": c, "source": "score"}) for c in names) == value(total, {"source": "score"})


def test_per_class_series_are_bounded_by_the_classes():
    metrics = Metrics(CollectorRegistry(), [f"c{i}" for i in range(20)])  # C = 21
    samples = [s for family in metrics.registry.collect() if family.name.startswith("ssd_class_")
               for s in family.samples if s.name.endswith("_total")]
    assert len(samples) == 6 * 20 * 2
    assert {s.labels["source"] for s in samples} == {"score", "finetune"}
    unnamed = Metrics(CollectorRegistry())  # labels beyond the names read class_<label>
    output = MultiBoxLoss.ssd_pytorch(3).compute(
        (torch.zeros(1, 8732, 4), torch.zeros(1, 8732, 3), prior_boxes(VOC_300)),
        [torch.tensor([[0.1, 0.1, 0.5, 0.5, 1.0]])])
    record_match_stats(unnamed, "score", output)
    assert unnamed.registry.get_sample_value("ssd_class_ground_truth_boxes_total",
                                             {"class": "class_1", "source": "score"}) == 1
