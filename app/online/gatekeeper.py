"""Screening and the publish gate, as the trainer thread uses them (the rules: ssd_core.online.screening,
ssd_core.online.gate). Keeps the served version's validation figures cached per (version, validation-set
hash), the screening window of accepted jobs, and the validation gauges.

The served version's per-image parts (`ssd_core.online.gate.ImageScore`, by entry id: image and
annotation) are kept too: the holdout adds an accepted job's images to the validation set, which
changes its hash, so without them every such job would score the served version on the whole set
again; with them only the new (or re-annotated) images run. A published candidate's parts become the
served version's (the weights are the same)."""

from __future__ import annotations

import math
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
    JobState,
    JobView,
    ServedFigures,
)
from app.online.jobs import finite_or_none
from app.online.validation_set import ValidationSet
from app.serving.model_host import ModelHost, ModelVersion
from app.serving.served_loss import served_loss
from ssd_core.data.datasets import Sample
from ssd_core.loss.multibox import MultiBoxLoss
from ssd_core.online.gate import (
    GateConfig,
    GateDecision,
    ImageScore,
    ReferenceLine,
    ValidationScore,
    combine_scores,
    decide,
    per_image_scores,
    ungated,
)
from ssd_core.online.screening import ScreeningConfig, ScreeningHistory

# a median over fewer accepted jobs is one or two batches' loss: a single unusual batch would set the bar
SCREEN_MIN_JOBS = 5
_CACHED_VERSIONS = 4


@dataclass(frozen=True)
class GateOutcome:
    """What the gate did with a candidate: `evaluation` is the job's view of the judgement; `published`
    the version it became, or None when rejected (`reason` says why)."""

    evaluation: JobEvaluation
    published: ModelVersion | None
    reason: str | None = None


@dataclass(frozen=True)
class Judgement:
    """What the gate said of one candidate: `evaluation` is the job's view of it; `score` (None when ungated)
    and `images` (entry id -> the candidate's part) become the served version's figures if it is published."""

    decision: GateDecision
    evaluation: JobEvaluation
    digest: str
    score: ValidationScore | None = None
    images: dict[str, ImageScore] = field(default_factory=dict)


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
        self.config = GateConfig(settings.gate_tolerance, settings.gate_noise_z, settings.gate_min_images,
                                 settings.gate_bootstrap)
        self._history = ScreeningHistory(ScreeningConfig(settings.screen_ratio, settings.screen_window,
                                                         SCREEN_MIN_JOBS))
        self._scores: OrderedDict[tuple[int, str], ValidationScore] = OrderedDict()
        self._served_images: tuple[int, dict[str, ImageScore]] = (-1, {})  # (version, entry id -> its image's part)
        self._line = ReferenceLine()  # what candidates are judged against
        metrics.validation_images.set(len(validation))

    def restore_history(self, views: list[JobView]) -> None:
        """Refill the screening window from journalled jobs (oldest first): the accepted ones' pre-training loss."""
        for view in views:
            if view.status == JobState.succeeded:
                self.accept(view.screening)

    # ---- screening

    def screen(self, samples: list[Sample], force: bool) -> tuple[JobScreening, str | None]:
        """Score the batch with the served model (the image form of /score-loss) and judge it: the job's
        screening view, and why the job ends rejected (None: it trains)."""
        output, served = served_loss(samples, self.host, self.criterion)
        verdict = self._history.judge(float(output.loss_l), float(output.loss_c))
        rejection = verdict.reason if verdict.stops(force) else None
        if rejection is not None:
            self.metrics.screening_rejections.inc()
        view = JobScreening(
            model_version=served.version, loss=finite_or_none(verdict.loss), loss_l=finite_or_none(verdict.loss_l),
            loss_c=finite_or_none(verdict.loss_c), median=verdict.median, threshold=verdict.threshold, jobs=verdict.jobs,
            passed=verdict.passed, forced=force,
        )
        return view, rejection

    def accept(self, screening: JobScreening | None) -> None:
        """A job succeeded: its pre-training loss joins the screening window. An unscreened job has none; a
        non-finite one (null in the view) is left out by the window."""
        if screening is not None:
            self._history.accept(_or_nan(screening.loss_l), _or_nan(screening.loss_c))

    # ---- the gate

    def gate(self, candidate: nn.Module, device, steps: int) -> GateOutcome:
        """Judge `candidate` (the trainer's network, after `steps` steps) against the served version and
        publish it unless rejected; a published candidate's figures become the served version's."""
        judgement = self._evaluate(candidate, device)
        decision = judgement.decision
        self.metrics.gate_decisions.labels(decision=decision.decision).inc()
        if decision.decision == "rejected":
            return GateOutcome(judgement.evaluation, None, decision.reason)
        published = self.host.publish(candidate, steps)
        self._published(published, judgement)
        return GateOutcome(judgement.evaluation, published)

    def _evaluate(self, candidate: nn.Module, device) -> Judgement:
        """Judge `candidate` (the trainer's network) against the served version."""
        started = time.perf_counter()
        ids, samples, digest = self.validation.snapshot()
        self.metrics.validation_images.set(len(samples))
        if not self.config.judges(len(samples)):
            decision = ungated(len(samples), self.config)
            return Judgement(decision, self._view(decision, len(samples), digest, None, None, None, started), digest)
        served_version = self.host.current
        served = self._served_score(served_version, ids, samples, digest)
        reference_version, reference = self._line.reference(served_version.version, served, digest)
        images = self._score_images(candidate, samples, device)
        score = combine_scores(images, samples, self.settings.num_classes - 1)
        decision = decide(reference, score, len(samples), self.config)
        self.metrics.evaluation_seconds.observe(time.perf_counter() - started)
        view = self._view(decision, len(samples), digest, served_version, served, score, started)
        return Judgement(decision, view.model_copy(update={"reference_version": reference_version}), digest, score,
                         dict(zip(ids, images, strict=True)))

    def _published(self, version: ModelVersion, judgement: Judgement) -> None:
        """`version` was published from the candidate of `judgement`: its figures become the served version's."""
        if judgement.score is not None:
            self._served_images = (version.version, judgement.images)
            self._remember(version.version, judgement.digest, judgement.score)
            self._line.published(version.version, judgement.score, judgement.digest)
            self._set_gauges(judgement.score)

    def _served_score(self, served: ModelVersion, ids: list[str], samples: list[Sample], digest: str) -> ValidationScore:
        """The served version's score on the set: cached, or combined from its kept per-image parts and the
        parts of the images it has not been run on (`ids`: the entries' ids, in `samples`' order)."""
        if (served.version, digest) not in self._scores:
            version, parts = self._served_images
            parts = parts if version == served.version else {}
            missing = [i for i, entry in enumerate(ids) if entry not in parts]
            new = self._score_images(served.model, [samples[i] for i in missing], self.host.device)
            parts = {**{entry: parts[entry] for entry in ids if entry in parts},
                     **{ids[i]: part for i, part in zip(missing, new, strict=True)}}
            self._served_images = (served.version, parts)
            score = combine_scores([parts[entry] for entry in ids], samples, self.settings.num_classes - 1)
            self._remember(served.version, digest, score)
        score = self._scores[(served.version, digest)]
        self._set_gauges(score)
        return score

    def _remember(self, version: int, digest: str, score: ValidationScore) -> None:
        self._scores[(version, digest)] = score
        while len(self._scores) > _CACHED_VERSIONS:
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
        return JobEvaluation(
            validation_images=images, validation_hash=digest,
            served=None if served is None or served_version is None else ServedFigures(
                version=served_version.version, map_50=served.map_50, loss=served.loss),
            candidate=None if candidate is None else CandidateFigures(map_50=candidate.map_50,
                                                                      loss=finite_or_none(candidate.loss)),
            decision=decision.decision, delta=decision.delta, margin=decision.margin, noise=decision.noise,
            reason=decision.reason,
            seconds=time.perf_counter() - started,
        )


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value
