"""Screening and the publish gate, as the trainer thread uses them (the rules: ssd_core.online.screening,
ssd_core.online.label_quality, ssd_core.online.gate). Keeps per-image parts of the served and the
reference versions on the validation set (`ssd_core.online.gate.ImageScore`, by entry id: image and
annotation), their figures cached per (version, validation-set hash), and the validation gauges.

Screening compares each of a job's images with the served model's per-image losses on the validation
set now (its kept parts), and once the model is competent each box with its confident detections.
The gate judges a candidate against the reference version (`ReferenceLine`) on the validation set as
it is: the holdout grows the set after most jobs, so the served and reference versions are run on the
new (or re-annotated) images only and their kept parts reused; a published candidate's parts become
its version's (the weights are the same)."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from torch import nn

from app.core.metrics import Metrics
from app.core.settings import Settings
from app.online.job_view import (
    CandidateFigures,
    JobEvaluation,
    JobScreening,
    QuarantinedImage,
    QuarantineIssue,
    ServedFigures,
)
from app.online.jobs import finite_or_none
from app.online.validation_set import ValidationSet
from app.serving.model_host import ModelHost, ModelVersion
from ssd_core.data.datasets import Sample
from ssd_core.loss.multibox import MultiBoxLoss
from ssd_core.online.gate import (
    GateConfig,
    GateDecision,
    ImageScore,
    ReferenceLine,
    ValidationScore,
    combine_scores,
    compare_images,
    decide,
    per_image_scores,
    ungated,
)
from ssd_core.online.label_quality import BoxIssue, LabelCheckConfig
from ssd_core.online.screening import Competence, ImageLoss, ScreeningConfig, ScreeningVerdict, screen_batch

_CACHED_SCORES = 4


@dataclass(frozen=True)
class GateOutcome:
    """What the gate did with a candidate: `evaluation` is the job's view of the judgement; `published`
    the version it became, or None when rejected (`reason` says why)."""

    evaluation: JobEvaluation
    published: ModelVersion | None
    reason: str | None = None


@dataclass(frozen=True)
class Screened:
    """What screening said of a job: its `view`, the `quarantined` image indices (trained only when forced)
    and the `rejection` that ends the job (None: it trains)."""

    view: JobScreening
    quarantined: tuple[int, ...]
    rejection: str | None


@dataclass(frozen=True)
class Judgement:
    """What the gate said of one candidate: `evaluation` is the job's view of it; `score` (None when ungated)
    and `images` (entry id -> the candidate's part) become the published version's figures; `better`: it
    scored at least the reference's mAP@0.5 on the same images."""

    decision: GateDecision
    evaluation: JobEvaluation
    digest: str
    score: ValidationScore | None = None
    images: dict[str, ImageScore] = field(default_factory=dict)
    better: bool = False


class Gatekeeper:
    """Args: host (the served versions), validation (the set), criterion (the trainer's loss)."""

    def __init__(
        self, host: ModelHost, validation: ValidationSet, criterion: MultiBoxLoss, settings: Settings, metrics: Metrics
    ) -> None:
        self.host = host
        self.validation = validation
        self.criterion = criterion
        self.settings = settings
        self.metrics = metrics
        self.config = GateConfig(
            settings.gate_tolerance, settings.gate_noise_z, settings.gate_min_images, settings.gate_bootstrap,
            loss_tolerance=settings.gate_loss_tolerance, detection_tolerance=settings.gate_detection_tolerance,
            paired_z=settings.gate_paired_z)
        self.screening = ScreeningConfig(
            loss_ratio=settings.screen_ratio, min_map=settings.screen_min_map,
            label_min_map=settings.screen_label_min_map, reject_share=settings.screen_reject_share,
            labels=LabelCheckConfig(confidence=settings.screen_confidence))
        self._scores: OrderedDict[tuple[int, str], ValidationScore] = OrderedDict()
        self._parts: dict[int, dict[str, ImageScore]] = {}  # version -> entry id -> its image's part
        self._line = ReferenceLine()  # what candidates are judged against
        self._reference: ModelVersion | None = None  # the line's best version (its frozen weights)
        metrics.validation_images.set(len(validation))

    # ---- screening

    def screen(self, samples: list[Sample], force: bool) -> Screened:
        """Judge the job's images with the served model against its per-image losses on the validation set now."""
        started = time.perf_counter()
        served = self.host.current
        batch = self._score_images(served.model, samples, self.host.device)
        ids, validation, digest = self.validation.snapshot()
        competence, reference = Competence(0, -1.0), []
        if validation:
            parts = self._version_parts(served, ids, validation)
            score = self._score_of(served.version, digest, [parts[entry] for entry in ids], validation)
            competence = Competence(sum(len(s.boxes) > 0 for s in validation), score.map_50)
            reference = [_image_loss(parts[entry]) for entry in ids]
        verdict = screen_batch(samples, [_image_loss(image) for image in batch], [image.detections for image in batch],
                               reference, competence, self.screening)
        if verdict.stops(force):
            self.metrics.screening_rejections.inc()
        self.metrics.quarantined_images.inc(len(verdict.quarantined))
        positives = max(1, sum(image.positives for image in batch))
        loss_l = sum(image.loss_l_sum for image in batch) / positives
        loss_c = sum(image.loss_c_sum for image in batch) / positives
        view = JobScreening(
            model_version=served.version, loss=finite_or_none(loss_l + loss_c), loss_l=finite_or_none(loss_l),
            loss_c=finite_or_none(loss_c), losses_checked=verdict.losses_checked, labels_checked=verdict.labels_checked,
            quiet_reason=verdict.quiet_reason, baseline_l=verdict.baseline_l, baseline_c=verdict.baseline_c,
            threshold_l=verdict.threshold_l, threshold_c=verdict.threshold_c, quarantined=len(verdict.quarantined),
            images=self._listed(verdict), passed=verdict.reason is None, forced=force,
            seconds=time.perf_counter() - started,
        )
        return Screened(view, verdict.quarantined, verdict.reason if verdict.stops(force) else None)

    def _listed(self, verdict: ScreeningVerdict) -> list[QuarantinedImage]:
        return [QuarantinedImage(image=i, quarantined=i in verdict.quarantined,
                                 issues=[self._issue(issue) for issue in issues])
                for i, issues in sorted(verdict.issues.items())]

    def _issue(self, issue: BoxIssue) -> QuarantineIssue:
        label = issue.model_label
        return QuarantineIssue(
            box=issue.box, issue=issue.kind, model_box=None if issue.model_box is None else list(issue.model_box),
            model_label=label, model_class=None if label is None else self.settings.class_name(label),
            model_score=issue.model_score, value=None if issue.value is None else finite_or_none(issue.value),
            threshold=issue.threshold)

    # ---- the gate

    def gate(self, candidate: nn.Module, device, steps: int) -> GateOutcome:
        """Judge `candidate` (the trainer's network, after `steps` steps) against the reference version and
        publish it unless rejected; a published candidate's figures become its version's."""
        judgement = self._evaluate(candidate, device)
        decision = judgement.decision
        self.metrics.gate_decisions.labels(decision=decision.decision).inc()
        if decision.decision == "rejected":
            return GateOutcome(judgement.evaluation, None, decision.reason)
        published = self.host.publish(candidate, steps)
        self._published(published, judgement)
        return GateOutcome(judgement.evaluation, published)

    def _evaluate(self, candidate: nn.Module, device) -> Judgement:
        """Judge `candidate` (the trainer's network) against the reference version on the validation set now."""
        started = time.perf_counter()
        ids, samples, digest = self.validation.snapshot()
        self.metrics.validation_images.set(len(samples))
        if not self.config.judges(len(samples)):
            decision = ungated(len(samples), self.config)
            return Judgement(decision, self._view(decision, len(samples), digest, None, None, None, started), digest)
        served_version = self.host.current
        served = self._score_of(served_version.version, digest, self._ordered(served_version, ids, samples), samples)
        self._set_gauges(served)
        if self._line.reference(served_version.version) == served_version.version:
            self._reference = served_version
        assert self._reference is not None
        reference_images = self._ordered(self._reference, ids, samples)
        reference = self._score_of(self._reference.version, digest, reference_images, samples)
        images = self._score_images(candidate, samples, device)
        score = combine_scores(images, samples, self.settings.num_classes - 1)
        paired = compare_images(reference_images, images, reference.matched, score.matched, self.config)
        decision = decide(reference, score, len(samples), self.config, paired)
        self.metrics.evaluation_seconds.observe(time.perf_counter() - started)
        view = self._view(decision, len(samples), digest, served_version, served, score, started)
        return Judgement(decision, view.model_copy(update={"reference_version": self._reference.version}), digest,
                         score, dict(zip(ids, images, strict=True)), score.map_50 >= reference.map_50)

    def _published(self, version: ModelVersion, judgement: Judgement) -> None:
        """`version` was published from the candidate of `judgement`: its figures become the version's."""
        if judgement.score is None:
            return
        self._parts[version.version] = judgement.images
        self._remember(version.version, judgement.digest, judgement.score)
        self._line.published(version.version, judgement.better)
        if judgement.better:
            self._reference = version
        kept = {version.version, self._reference.version if self._reference else version.version}
        self._parts = {v: parts for v, parts in self._parts.items() if v in kept}
        self._set_gauges(judgement.score)

    def _ordered(self, version: ModelVersion, ids: list[str], samples: list[Sample]) -> list[ImageScore]:
        parts = self._version_parts(version, ids, samples)
        return [parts[entry] for entry in ids]

    def _version_parts(self, version: ModelVersion, ids: list[str], samples: list[Sample]) -> dict[str, ImageScore]:
        """`version`'s per-image parts on the set (`ids`: its entries' ids, in `samples`' order): those kept, and
        the images it has not been run on, run now and kept."""
        parts = self._parts.get(version.version, {})
        missing = [i for i, entry in enumerate(ids) if entry not in parts]
        if missing:
            new = self._score_images(version.model, [samples[i] for i in missing], self.host.device)
            parts = {**{entry: parts[entry] for entry in ids if entry in parts},
                     **{ids[i]: part for i, part in zip(missing, new, strict=True)}}
            self._parts[version.version] = parts
            kept = {version.version, self.host.current.version, self._reference.version if self._reference else -1}
            self._parts = {v: kept_parts for v, kept_parts in self._parts.items() if v in kept}
        return parts

    def _score_of(self, version: int, digest: str, images: list[ImageScore], samples: list[Sample]) -> ValidationScore:
        """`version`'s score on the set from its per-image parts, cached per (version, digest)."""
        if (version, digest) not in self._scores:
            self._remember(version, digest, combine_scores(images, samples, self.settings.num_classes - 1))
        return self._scores[(version, digest)]

    def _remember(self, version: int, digest: str, score: ValidationScore) -> None:
        self._scores[(version, digest)] = score
        while len(self._scores) > _CACHED_SCORES:
            self._scores.popitem(last=False)

    def _score_images(self, model: nn.Module, samples: list[Sample], device) -> list[ImageScore]:
        return per_image_scores(model, samples, self.criterion, device=device, max_detections=self.settings.max_detections)

    def _set_gauges(self, score: ValidationScore) -> None:
        self.metrics.validation_map_50.set(score.map_50)
        self.metrics.validation_loss.set(score.loss)
        for label, ap in score.per_class.items():
            if ap >= 0:
                self.metrics.validation_ap_50.labels(**{"class": self.settings.class_name(label)}).set(ap)

    @staticmethod
    def _view(
        decision: GateDecision, images: int, digest: str, served_version: ModelVersion | None,
        served: ValidationScore | None, candidate: ValidationScore | None, started: float,
    ) -> JobEvaluation:
        paired = decision.paired
        return JobEvaluation(
            validation_images=images, validation_hash=digest,
            served=None if served is None or served_version is None else ServedFigures(
                version=served_version.version, map_50=served.map_50, loss=served.loss),
            candidate=None if candidate is None else CandidateFigures(map_50=candidate.map_50,
                                                                      loss=finite_or_none(candidate.loss)),
            decision=decision.decision, delta=decision.delta, margin=decision.margin, noise=decision.noise,
            loss_increase=None if paired is None else finite_or_none(paired.loss_increase),
            loss_bound=None if paired is None else finite_or_none(paired.loss_bound),
            quality_change=None if paired is None else paired.quality_change,
            quality_bound=None if paired is None else paired.quality_bound,
            reason=decision.reason,
            seconds=time.perf_counter() - started,
        )


def _image_loss(image: ImageScore) -> ImageLoss:
    return ImageLoss.from_sums(image.loss_l_sum, image.loss_c_sum, image.positives)
