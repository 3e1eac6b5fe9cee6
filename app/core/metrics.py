"""Every Prometheus metric of the service, defined on a registry passed in.

Names and labels are the contract with `deploy/` (docs/ARCHITECTURE.md, "Prometheus metric names").
Buckets are chosen per quantity rather than the default latency buckets.

With several worker processes (`SSD_WORKERS` > 1) prometheus_client's multiprocess mode is used: the
environment variable PROMETHEUS_MULTIPROC_DIR, set before the workers start, makes every metric write
its values to files there, and `exposition` merges the files of all workers. Each gauge names how its
per-process values merge (`multiprocess_mode`); Info metrics are not merged by prometheus_client and
are taken from the answering process (they are the same in every worker). docs/SCALING.md lists the limits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:  # annotations only: `python -m app`'s supervising parent imports this module without torch
    import torch

Source = Literal["score", "finetune"]
# the routes whose forward passes the inference worker batches (the `route` label of ssd_inference_*)
INFERENCE_ROUTES = ("/detect", "/score-loss", "/v2/models/ssd/infer")
SERVING_BACKENDS = ("torch", "onnxruntime")  # the `backend` label of ssd_inference_compute_seconds
SOURCES: tuple[Source, ...] = ("score", "finetune")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# the label values of ssd_label_studio_* (app.labelstudio)
LABEL_STUDIO_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING", "other")
LABEL_STUDIO_OUTCOMES = (
    "streamed",  # fetched from Label Studio and added to the annotation stream
    "removed",  # deleted in Label Studio: its pending image left the stream
    "not_found",  # Label Studio has no such annotation (a forged or stale webhook): nothing trained
    "cancelled",  # a skipped task (was_cancelled)
    "no_boxes",  # no box usable for training
    "failed",  # Label Studio, the task or its image could not be read
    "dropped",  # the intake queue was full
)
LABEL_STUDIO_SKIP_REASONS = ("rotated", "unknown_label", "not_rectangle", "empty")

LOSS_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)  # log-spaced
COUNT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)  # per image
IOU_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 0.1 .. 1.0, linear
REPLAY_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)  # replayed images per step
EVALUATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # images per forward pass
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
COMPUTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _ClassStats(Protocol):  # each [L], L = num_classes - 1
    num_ground_truth: torch.Tensor
    num_positives: torch.Tensor
    num_forced_matches: torch.Tensor
    matched_iou_sum: torch.Tensor
    loss_l_sum: torch.Tensor
    loss_c_sum: torch.Tensor


class _MatchStats(Protocol):
    num_ground_truth: torch.Tensor  # [B]
    num_positives: torch.Tensor  # [B]
    num_negatives: torch.Tensor  # [B]
    num_forced_matches: torch.Tensor  # [B]
    matched_ious: torch.Tensor  # [K]
    per_class: _ClassStats


class _LossOutput(Protocol):
    loss_l: torch.Tensor
    loss_c: torch.Tensor
    stats: _MatchStats


def _histogram(
    registry: CollectorRegistry, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
) -> Histogram:
    return Histogram(name, documentation, labels, buckets=buckets, registry=registry)


# per-class counters: (attribute, name, help, ClassStats field); label `class` is bounded by num_classes - 1
CLASS_COUNTERS = (
    ("class_ground_truth_boxes", "ssd_class_ground_truth_boxes", "Ground-truth boxes seen, by class.",
     "num_ground_truth"),
    ("class_positives", "ssd_class_positives", "Positive priors matched to a box of the class.", "num_positives"),
    ("class_forced_matches", "ssd_class_forced_matches",
     "Boxes of the class with no prior at or above the threshold, matched only by the forced step.",
     "num_forced_matches"),
    ("class_matched_iou", "ssd_class_matched_iou",
     "Sum over the class's positive priors of their IoU with their box (ratio).", "matched_iou_sum"),
    ("class_loss_loc", "ssd_class_loss_loc",
     "Sum over the class's positive priors of the loc (Smooth L1) loss, not normalised.", "loss_l_sum"),
    ("class_loss_conf", "ssd_class_loss_conf",
     "Sum over the class's positive priors of the conf (cross-entropy) loss, not normalised.", "loss_c_sum"),
)


class Metrics:
    """The service's metrics; one instance per application, on its own registry.

    Args:
        class_names: names of the object labels 0 .. L - 1, the values of the per-class counters' `class`
            label (every class and source appears at zero from the start); labels beyond them read
            `class_<label>`.
    """

    def __init__(self, registry: CollectorRegistry, class_names: Sequence[str] = ()) -> None:
        self.registry = registry
        self.class_names = tuple(class_names)
        # registration order is the exposition order
        self._loss_metrics(registry)
        self._training_metrics(registry)
        self._http_metrics(registry)
        self._inference_metrics(registry)
        self._validation_metrics(registry)
        self._label_studio_metrics(registry)
        self._info_and_zeros(registry)

    def _loss_metrics(self, registry: CollectorRegistry) -> None:
        """The loss and match statistics of every scored or trained batch, per source and per class."""
        source = ("source",)
        self.loss_loc = _histogram(
            registry, "ssd_loss_loc", "Localisation (Smooth L1) loss per batch.", source, LOSS_BUCKETS
        )
        self.loss_conf = _histogram(
            registry, "ssd_loss_conf", "Confidence (cross-entropy) loss per batch.", source, LOSS_BUCKETS
        )
        self.positives_per_image = _histogram(
            registry, "ssd_positives_per_image", "Matched (positive) priors per image.", source, COUNT_BUCKETS
        )
        self.hard_negatives_per_image = _histogram(
            registry, "ssd_hard_negatives_per_image", "Mined negative priors per image.", source, COUNT_BUCKETS
        )
        self.matched_iou = _histogram(
            registry, "ssd_matched_iou", "IoU of each positive prior with its ground truth (ratio).", source,
            IOU_BUCKETS,
        )
        self.ground_truth_boxes = Counter(
            "ssd_ground_truth_boxes", "Ground-truth boxes seen.", source, registry=registry
        )
        self.forced_matches = Counter(
            "ssd_forced_matches", "Truths with no prior at or above the threshold, matched only by the forced step.",
            source, registry=registry,
        )
        for attribute, name, documentation, _ in CLASS_COUNTERS:
            setattr(self, attribute, Counter(name, documentation, ("class", "source"), registry=registry))

    def _training_metrics(self, registry: CollectorRegistry) -> None:
        """The trainer: steps, jobs, the queue, versions, checkpoints, replay."""
        self.finetune_steps = Counter("ssd_finetune_steps", "Completed optimizer steps.", registry=registry)
        self.finetune_skipped_steps = Counter(
            "ssd_finetune_skipped_steps", "Steps skipped for a non-finite loss or gradients.", registry=registry
        )
        self.finetune_jobs = Counter("ssd_finetune_jobs", "Finished fine-tune jobs.", ("state",), registry=registry)
        # multiprocess_mode: how the gauge's per-process values merge (ignored with one process)
        self.finetune_queue_depth = Gauge(
            "ssd_finetune_queue_depth", "Queued fine-tune jobs.", registry=registry, multiprocess_mode="livesum"
        )
        self.learning_rate = Gauge(
            "ssd_learning_rate", "Learning rate of the last step.", registry=registry, multiprocess_mode="mostrecent"
        )
        self.model_version = Gauge(  # versions only grow: the newest any worker serves
            "ssd_model_version", "Published model version.", registry=registry, multiprocess_mode="max"
        )
        self.model_reloads = Counter(
            "ssd_model_reloads", "Checkpoint loads by a server replica following the shared directory.", ("outcome",),
            registry=registry,
        )
        self.checkpoints = Counter("ssd_checkpoints", "Checkpoint writes.", ("outcome",), registry=registry)
        self.replay_images = Gauge(
            "ssd_replay_images", "Images in the replay memory.", registry=registry, multiprocess_mode="mostrecent"
        )
        self.replay_class_images = Gauge(
            "ssd_replay_class_images", "Replay-memory images containing each class (no_object: images without "
            "objects).", ("class",), registry=registry, multiprocess_mode="mostrecent",
        )
        self.replayed_images_per_step = _histogram(
            registry, "ssd_replayed_images_per_step", "Replayed images mixed into each training step.", (),
            REPLAY_BUCKETS,
        )

    def _http_metrics(self, registry: CollectorRegistry) -> None:
        """Requests by route."""
        http = ("route", "method")
        self.http_requests = Counter(
            "ssd_http_requests", "HTTP requests (route = path template).", (*http, "status"), registry=registry
        )
        self.http_request_duration = _histogram(
            registry, "ssd_http_request_duration_seconds", "HTTP request latency.", http, LATENCY_BUCKETS
        )
        self.http_requests_in_progress = Gauge(
            "ssd_http_requests_in_progress", "HTTP requests in flight.", http, registry=registry,
            multiprocess_mode="livesum",
        )
        self.http_stalled_bodies = Counter(
            "ssd_http_stalled_bodies", "Requests dropped (408): no body bytes for SSD_BODY_STALL_TIMEOUT_S.",
            registry=registry,
        )
        self.images_processed = Counter(
            "ssd_images_processed", "Images decoded and run through the model.", ("route",), registry=registry
        )

    def _inference_metrics(self, registry: CollectorRegistry) -> None:
        """The inference thread: batches, waits, queued and cancelled images."""
        route = ("route",)  # batch size and compute: one observation per forward under each route in it
        self.inference_batch_size = _histogram(
            registry, "ssd_inference_batch_size", "Images per forward pass of the hosted model.", route, BATCH_BUCKETS
        )
        self.inference_queue_wait = _histogram(
            registry, "ssd_inference_queue_wait_seconds", "Wait of a request's images for their forward pass.", route,
            WAIT_BUCKETS,
        )
        self.inference_compute = _histogram(  # backend: torch or onnxruntime (SERVING_BACKENDS)
            registry, "ssd_inference_compute_seconds", "Duration of a forward pass of the hosted model.",
            ("route", "backend"), COMPUTE_BUCKETS,
        )
        self.backend_fallbacks = Counter(
            "ssd_backend_fallbacks", "Published versions the configured backend could not build, served by torch.",
            registry=registry,
        )
        self.inference_queued_images = Gauge(
            "ssd_inference_queued_images", "Images waiting for a forward pass.", registry=registry,
            multiprocess_mode="livesum",
        )
        self.inference_cancelled = Counter(
            "ssd_inference_cancelled_images", "Queued images dropped because their client disconnected.", route,
            registry=registry,
        )

    def _validation_metrics(self, registry: CollectorRegistry) -> None:
        """The validation set and the publish gate."""
        self.validation_images = Gauge(
            "ssd_validation_images", "Images in the validation set.", registry=registry, multiprocess_mode="mostrecent"
        )
        self.validation_map_50 = Gauge(
            "ssd_validation_map_50", "mAP@0.5 of the served version on the validation set (ratio), as of the last "
            "evaluation.", registry=registry, multiprocess_mode="mostrecent",
        )
        self.validation_loss = Gauge(
            "ssd_validation_loss", "Mean MultiBoxLoss of the served version on the validation set.",
            registry=registry, multiprocess_mode="mostrecent",
        )
        self.validation_ap_50 = Gauge(  # label values: the class names (bounded)
            "ssd_validation_ap_50", "AP@0.5 per class of the served version on the validation set (ratio).",
            ("class",), registry=registry, multiprocess_mode="mostrecent",
        )
        self.gate_decisions = Counter(
            "ssd_gate_decisions", "Publish gate decisions on fine-tune jobs.", ("decision",), registry=registry
        )
        self.screening_rejections = Counter(
            "ssd_screening_rejections", "Fine-tune jobs rejected by screening before their first step.",
            registry=registry,
        )
        self.quarantined_images = Counter(
            "ssd_quarantined_images", "Fine-tune images quarantined by screening (not trained on unless forced, "
            "never stored).", registry=registry,
        )
        self.evaluation_seconds = _histogram(
            registry, "ssd_evaluation_seconds", "Time the publish gate spent evaluating one job.", (),
            EVALUATION_BUCKETS,
        )

    def _label_studio_metrics(self, registry: CollectorRegistry) -> None:
        """Label Studio's ML backend (app.labelstudio): webhooks, the annotations they name, the stream, predictions;
        every label value from a fixed list (LABEL_STUDIO_*), all at zero from the start."""
        self.label_studio_webhooks = Counter(
            "ssd_label_studio_webhooks", "Webhooks received from Label Studio, by action (other: any other action).",
            ("action",), registry=registry,
        )
        self.label_studio_annotations = Counter(
            "ssd_label_studio_annotations", "Label Studio annotations the webhook intake handled, by outcome.",
            ("outcome",), registry=registry,
        )
        self.label_studio_skipped_boxes = Counter(
            "ssd_label_studio_skipped_boxes", "Annotated boxes not trained on, by reason.", ("reason",),
            registry=registry,
        )
        self.label_studio_pending_images = Gauge(
            "ssd_label_studio_pending_images", "Annotated images waiting in the annotation stream for a job.",
            registry=registry, multiprocess_mode="livesum",
        )
        self.label_studio_stream_jobs = Counter(
            "ssd_label_studio_stream_jobs", "Fine-tune jobs queued by the annotation stream.", registry=registry
        )
        self.label_studio_predicted_tasks = Counter(
            "ssd_label_studio_predicted_tasks", "Tasks answered by /labelstudio/predict, by outcome (image_failed: "
            "empty result, the image could not be fetched or decoded).", ("outcome",), registry=registry,
        )
        for action in LABEL_STUDIO_ACTIONS:
            self.label_studio_webhooks.labels(action=action)
        for outcome in LABEL_STUDIO_OUTCOMES:
            self.label_studio_annotations.labels(outcome=outcome)
        for reason in LABEL_STUDIO_SKIP_REASONS:
            self.label_studio_skipped_boxes.labels(reason=reason)
        for outcome in ("predicted", "image_failed"):
            self.label_studio_predicted_tasks.labels(outcome=outcome)

    def _info_and_zeros(self, registry: CollectorRegistry) -> None:
        """Build and model info; every label set known up front, at zero before its first event."""
        self.build = Info("ssd_build", "Build information.", registry=registry)
        self.model = Info("ssd_model", "Hosted model: architecture, classes, device and serving backend.",
                          registry=registry)
        # label sets known up front appear at zero before their first event
        for state in ("succeeded", "failed", "cancelled", "rejected"):
            self.finetune_jobs.labels(state=state)
        for decision in ("published", "rejected", "ungated"):
            self.gate_decisions.labels(decision=decision)
        for outcome in ("saved", "failed"):
            self.checkpoints.labels(outcome=outcome)
        for outcome in ("loaded", "failed"):
            self.model_reloads.labels(outcome=outcome)
        for route in INFERENCE_ROUTES:
            self.inference_cancelled.labels(route=route)
        self._class_children: dict[tuple[str, str], list] = {}  # (attribute, source) -> child per label
        for attribute, *_ in CLASS_COUNTERS:
            for source_name in SOURCES:
                self.class_children(attribute, source_name, len(self.class_names))

    def class_children(self, attribute: str, source: Source, num_labels: int) -> list:
        """The children of a per-class counter for `source`, one per label 0 .. num_labels - 1 (cached)."""
        children = self._class_children.setdefault((attribute, source), [])
        counter = getattr(self, attribute)
        for label in range(len(children), num_labels):
            name = self.class_names[label] if label < len(self.class_names) else f"class_{label}"
            children.append(counter.labels(name, source))
        return children


class _InfoOnly:
    """A collector exposing only the Info metrics of a registry (multiprocess mode cannot merge them)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        return (family for family in self.registry.collect() if family.type == "info")


def exposition(metrics: Metrics) -> bytes:
    """The Prometheus text format of `metrics`: its registry, or in multiprocess mode (PROMETHEUS_MULTIPROC_DIR
    set) the values of every worker process merged from that directory plus this process's Info metrics."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return generate_latest(metrics.registry)
    merged = CollectorRegistry()
    MultiProcessCollector(merged, directory)
    merged.register(_InfoOnly(metrics.registry))
    return generate_latest(merged)


def prepare_multiprocess_dir(workers: int) -> Path | None:
    """Empty PROMETHEUS_MULTIPROC_DIR; call in the parent before any worker starts (values an earlier run
    left there would otherwise be added to this run's).

    Returns:
        the directory, or None when the variable is unset (single-process mode).

    Raises:
        ValueError: `workers` > 1 without the variable: each worker would count only its own requests.
    """
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        if workers > 1:
            raise ValueError(f"SSD_WORKERS={workers} needs {MULTIPROC_ENV} (an empty directory per container) "
                             "so that /metrics counts the requests of every worker")
        return None
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return path


def record_match_stats(metrics: Metrics, source: Source, output: _LossOutput) -> None:
    """Record one scored or trained batch's losses and match statistics.

    Args:
        output: a `ssd_core.loss.multibox.LossOutput`; its stats hold per-image tensors [B] and matched IoUs [K].
    """
    stats = output.stats
    metrics.loss_loc.labels(source=source).observe(float(output.loss_l))
    metrics.loss_conf.labels(source=source).observe(float(output.loss_c))
    per_value = (
        (metrics.positives_per_image, stats.num_positives),  # [B]
        (metrics.hard_negatives_per_image, stats.num_negatives),  # [B]
        (metrics.matched_iou, stats.matched_ious),  # [K]
    )
    for histogram, values in per_value:
        child = histogram.labels(source=source)
        for value in values.tolist():
            child.observe(value)
    metrics.ground_truth_boxes.labels(source=source).inc(int(stats.num_ground_truth.sum()))
    metrics.forced_matches.labels(source=source).inc(int(stats.num_forced_matches.sum()))
    _record_per_class(metrics, source, stats.per_class)


def _record_per_class(metrics: Metrics, source: Source, per_class: _ClassStats) -> None:
    """Add one batch's per-class sums (ClassStats tensors [L]) to the per-class counters."""
    for attribute, _, _, field in CLASS_COUNTERS:
        values = getattr(per_class, field).tolist()  # [L]
        for child, value in zip(metrics.class_children(attribute, source, len(values)), values, strict=True):
            if value:
                child.inc(value)
