"""Label Studio's ML backend protocol at `/labelstudio` (docs/LABEL_STUDIO.md): `/health`, `/setup`,
`/predict` and `/versions` on every replica, `/webhook` on the trainer.

With SSD_API_TOKEN set, every route but `/webhook` wants HTTP Basic whose password is the token (Label
Studio's "Use basic auth" fields; any user name) or the usual Bearer token. `/webhook` takes none: Label
Studio's webhooks carry no credentials, so a webhook is only a notification (app.labelstudio.intake).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from app.api.deps import HostDep, InferenceDep, SettingsDep, StoreDep, TrainerRole, require_basic_token
from app.api.disconnect import wait_for_disconnect
from app.api.errors import ApiError
from app.api.inputs import parse_json
from app.api.openapi import ERROR_RESPONSES, ROLE_RESPONSES
from app.api.schemas import (
    LabelStudioHealth,
    LabelStudioModelVersion,
    LabelStudioPrediction,
    LabelStudioPredictions,
    LabelStudioPredictRequest,
    LabelStudioSetup,
    LabelStudioVersions,
    LabelStudioWebhook,
    LabelStudioWebhookAnswer,
)
from app.core.settings import Settings
from app.labelstudio.backend import LabelStudioBackend, version_name

_AUTH_RESPONSES = {401: {"model": None, "description": "SSD_API_TOKEN is set and neither HTTP Basic with it as the "
                         "password nor the Bearer token was sent"}}


def get_backend(request: Request) -> LabelStudioBackend:
    backend = getattr(request.app.state, "label_studio", None)
    if backend is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet")
    return backend


BackendDep = Annotated[LabelStudioBackend, Depends(get_backend)]
LabelStudioAuth = Depends(require_basic_token)

router = APIRouter(prefix="/labelstudio", tags=["label studio"])


def _model_version(settings: Settings, host: HostDep) -> str:
    return version_name(settings, host.current.version)


@router.get("/health", response_model=LabelStudioHealth, dependencies=[LabelStudioAuth], responses=_AUTH_RESPONSES,
            summary="Label Studio's health check (1 s timeout)")
async def health(settings: SettingsDep, host: HostDep) -> LabelStudioHealth:
    return LabelStudioHealth(status="UP", model_class="ssd-service", model_version=_model_version(settings, host))


@router.post("/setup", response_model=LabelStudioModelVersion, dependencies=[LabelStudioAuth],
             responses={**ERROR_RESPONSES, **_AUTH_RESPONSES},
             summary="Label Studio connects a project: its label config is checked against the model's classes")
async def setup(request: Request, settings: SettingsDep, host: HostDep, backend: BackendDep) -> LabelStudioModelVersion:
    """422 naming `schema` when the config's RectangleLabels name labels outside the model's classes (the
    message lists them; Label Studio shows it), 409 when SSD_LABEL_STUDIO_URL or _API_KEY is unset."""
    body = await run_in_threadpool(parse_json, LabelStudioSetup, await request.body())
    backend.require_client()
    backend.control(body.schema_, "schema")
    return LabelStudioModelVersion(model_version=_model_version(settings, host))


@router.post("/predict", response_model=LabelStudioPredictions, dependencies=[LabelStudioAuth],
             responses={**ERROR_RESPONSES, **_AUTH_RESPONSES},
             summary="Pre-annotations for Label Studio's tasks: one prediction per task, in order")
async def predict(request: Request, host: HostDep, inference: InferenceDep, backend: BackendDep) -> LabelStudioPredictions:
    body = await run_in_threadpool(parse_json, LabelStudioPredictRequest, await request.body())
    control = backend.control(body.label_config, "label_config")
    results = await backend.predict(body.tasks, control, wait_for_disconnect(request), host, inference)
    return LabelStudioPredictions(results=[LabelStudioPrediction(**result) for result in results])


@router.get("/versions", response_model=LabelStudioVersions, dependencies=[LabelStudioAuth],
            responses=_AUTH_RESPONSES, summary="Model versions Label Studio can choose between")
async def versions(host: HostDep, store: StoreDep, backend: BackendDep) -> LabelStudioVersions:
    return LabelStudioVersions(versions=await run_in_threadpool(backend.versions, host, store))


@router.post("/webhook", response_model=LabelStudioWebhookAnswer, dependencies=[TrainerRole],
             responses={**ERROR_RESPONSES, **ROLE_RESPONSES},
             summary="Label Studio's project events: queued, the annotation fetched from Label Studio later")
async def webhook(request: Request, backend: BackendDep) -> LabelStudioWebhookAnswer:
    """Answers at once (Label Studio waits 1 s inside the annotator's save): the webhook's annotation or
    project id is queued; the intake's thread fetches it from Label Studio with the service's key and
    trains on what Label Studio returns."""
    intake = backend.require_intake()
    event = parse_json(LabelStudioWebhook, await request.body())
    return LabelStudioWebhookAnswer(status=intake.notify(event.model_dump()))
