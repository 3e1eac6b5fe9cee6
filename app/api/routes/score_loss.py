"""`POST /score-loss`: the SSD loss of given predictions (JSON or safetensors) or of the hosted model on
labelled images, without changing any weight."""

from __future__ import annotations

import torch
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from app.api.deps import HostDep, InferenceDep, MetricsDep, SettingsDep
from app.api.errors import ApiError, invalid
from app.api.inputs import BINARY, JSON, check_bkg_label, labelled_samples, media_type, parse_json
from app.api.loss_batch import LossBatch, predictions_batch, read_body, safetensors_batch
from app.api.openapi import ERROR_RESPONSES, request_body
from app.api.schemas import LossOptions, ScoreLossRequest, ScoreLossResponse
from app.core.metrics import Metrics, record_match_stats
from app.core.settings import Settings
from app.serving.inference import InferenceWorker, forward
from app.serving.model_host import ModelHost
from app.serving.scoring import loss_inputs, score_predictions
from ssd_core.loss.multibox import LossOutput, MultiBoxLoss

router = APIRouter(tags=["loss"])

BINARY_DOC = (
    "safetensors with tensors `loc` [B, P, 4], `conf` [B, P, C], `targets` [B, M, 5|6] (normalised x1, y1, x2, "
    "y2, label, optional difficult; label < 0 = padding) and optional `priors` [P, 4]; loss options as JSON "
    "strings in `__metadata__` (e.g. {\"match_type\": \"bipartite\", \"neg_pos\": \"3\"}); partial labels as "
    "`__metadata__[\"labelled_classes\"]`, a JSON string of one list of 0-based labels (or null) per image"
)


def criterion_for(options: LossOptions, num_classes: int) -> MultiBoxLoss:
    """The seed's constructor with the request's options."""
    return MultiBoxLoss(
        num_classes, options.overlap_thresh, options.prior_for_matching, options.bkg_label, options.neg_mining,
        options.neg_pos, options.neg_overlap, options.encode_target,
        variance=options.variance, loc_weight=options.loc_weight, match_type=options.match_type,
    )


def score_batch(batch: LossBatch, num_classes: int) -> LossOutput:
    """The loss of a validated batch (no gradients)."""
    with torch.inference_mode():
        try:
            return criterion_for(batch.options, num_classes).compute(
                (batch.loc, batch.conf, batch.priors), batch.targets, batch.class_mask)
        except ValueError as error:  # the loss's own checks (e.g. option combinations)
            raise invalid("body", str(error)) from None


def score_safetensors(body: bytearray, model_priors: torch.Tensor, settings: Settings) -> LossOutput:
    """The binary form in one worker-thread call: parse (tensors are views of `body`), check, score."""
    return score_batch(safetensors_batch(body, model_priors, settings), settings.num_classes)


async def score_images(
    request: Request, parsed: ScoreLossRequest, host: ModelHost, inference: InferenceWorker, settings: Settings,
    metrics: Metrics,
) -> tuple[LossOutput, int]:
    """The image form: decode, run the current model version (batched with other requests), score its predictions."""
    assert parsed.images is not None
    check_bkg_label(parsed.options, settings)  # before any decoding
    criterion = criterion_for(parsed.options, settings.num_classes)

    def prepare() -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        samples = labelled_samples([(item.image, item) for item in parsed.images], settings)
        return loss_inputs(samples, host.spec, criterion)  # [B, 3, S, S], list[[n, 6]], [B, C] or None

    images, targets, class_mask = await run_in_threadpool(prepare)
    served = host.current
    loc, conf = await forward(request, inference, images, served, "/score-loss")  # [B, P, 4], [B, P, C]
    metrics.images_processed.labels(route="/score-loss").inc(len(images))
    output = await run_in_threadpool(score_predictions, loc, conf, host.priors, targets, class_mask, criterion)
    return output, served.version


def check_form(request: ScoreLossRequest) -> None:
    """Exactly one form: `predictions` + `targets` (+ `priors`), or `images`."""
    if request.images is not None:
        extra = [name for name in ("predictions", "targets", "priors", "labelled_classes")
                 if getattr(request, name) is not None]
        if extra:
            raise invalid(extra[0], "not allowed with `images` (the model predicts; boxes and labelled_classes "
                          "go with each image)")
    elif request.predictions is None:
        raise ApiError(422, "invalid_value", "body: give either `predictions` with `targets`, or `images`", "body")
    elif request.targets is None:
        raise invalid("targets", "required with `predictions`: one list of boxes per image")


def response(output: LossOutput, version: int, class_names: list[str]) -> ScoreLossResponse:
    loss_l, loss_c = float(output.loss_l), float(output.loss_c)
    if not all(abs(v) < float("inf") for v in (loss_l, loss_c)):
        raise invalid("predictions", "the loss overflowed to a non-finite value (predictions too large)")
    stats = output.stats
    totals = stats.totals()
    return ScoreLossResponse(
        loss=loss_l + loss_c, loss_l=loss_l, loss_c=loss_c, num_positives=totals["num_positives"],
        num_negatives=totals["num_negatives"], per_image=stats.per_image(),
        per_class=stats.per_class.rows(class_names),
        loss_c_negatives=float(stats.per_class.negative_loss_c_sum / stats.normalizer), model_version=version,
    )


@router.post(
    "/score-loss",
    response_model=ScoreLossResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body({JSON: ScoreLossRequest, BINARY: BINARY_DOC}),
    summary="SSD loss of predictions or of the hosted model on labelled images",
)
async def score_loss(
    request: Request, host: HostDep, inference: InferenceDep, settings: SettingsDep, metrics: MetricsDep
) -> ScoreLossResponse:
    """Three forms: JSON predictions + targets (boxes normalised), the same as a safetensors body
    (`application/octet-stream`), or JSON `images` with pixel boxes, scored with the hosted model."""
    kind = media_type(request.headers.get("content-type"), (JSON, BINARY))
    if kind == BINARY:
        body = await read_body(request)
        version = host.current.version
        output = await run_in_threadpool(score_safetensors, body, host.priors, settings)
    else:
        body = await request.body()
        parsed = await run_in_threadpool(parse_json, ScoreLossRequest, body)
        check_form(parsed)
        if parsed.images is not None:
            output, version = await score_images(request, parsed, host, inference, settings, metrics)
        else:
            batch = await run_in_threadpool(predictions_batch, parsed, host.priors, settings)
            version = host.current.version
            output = await run_in_threadpool(score_batch, batch, settings.num_classes)
    result = response(output, version, settings.object_class_names())
    record_match_stats(metrics, "score", output)
    return result
