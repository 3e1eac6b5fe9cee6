"""`POST /score-loss`: the SSD loss of given predictions (JSON or safetensors) or of the hosted model on
labelled images, without changing any weight."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import HostDep, InferenceDep, MetricsDep, SettingsDep
from app.api.disconnect import wait_for_disconnect
from app.api.errors import ApiError, invalid
from app.api.inputs import BINARY, JSON, media_type, parse_json
from app.api.loss_batch import receive_chunks
from app.api.loss_requests import labelled_images_loss, predictions_answer, safetensors_answer, scored_answer
from app.api.openapi import ERROR_RESPONSES, request_body
from app.api.schemas import ScoreLossRequest, ScoreLossResponse

router = APIRouter(tags=["loss"])

BINARY_DOC = (
    "safetensors with tensors `loc` [B, P, 4], `conf` [B, P, C], `targets` [B, M, 5|6] (normalised x1, y1, x2, "
    "y2, label, optional difficult; label < 0 = padding) and optional `priors` [P, 4]; loss options as JSON "
    "strings in `__metadata__` (e.g. {\"match_type\": \"bipartite\", \"neg_pos\": \"3\"}); partial labels as "
    "`__metadata__[\"labelled_classes\"]`, a JSON string of one list of 0-based labels (or null) per image"
)


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


@router.post(
    "/score-loss",
    response_model=ScoreLossResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body({JSON: ScoreLossRequest, BINARY: BINARY_DOC}),
    summary="SSD loss of predictions or of the hosted model on labelled images",
)
async def score_loss(
    request: Request, host: HostDep, inference: InferenceDep, settings: SettingsDep, metrics: MetricsDep
) -> Response:
    """Three forms: JSON predictions + targets (boxes normalised), the same as a safetensors body
    (`application/octet-stream`), or JSON `images` with pixel boxes, scored with the hosted model."""
    kind = media_type(request.headers.get("content-type"), (JSON, BINARY))
    if kind == BINARY:
        chunks = await receive_chunks(request)
        answer = await run_in_threadpool(
            safetensors_answer, chunks, host.priors, host.current.version, settings, metrics)
    else:
        body = await request.body()
        parsed = await run_in_threadpool(parse_json, ScoreLossRequest, body)
        check_form(parsed)
        if parsed.images is not None:
            output, version = await labelled_images_loss(
                wait_for_disconnect(request), parsed, "/score-loss", host, inference, settings, metrics)
            answer = await run_in_threadpool(scored_answer, output, version, settings, metrics)
        else:
            answer = await run_in_threadpool(
                predictions_answer, parsed, host.priors, host.current.version, settings, metrics)
    return Response(answer, media_type=JSON)
