"""FastAPI dependencies and their `Annotated` aliases (SettingsDep, HostDep, ...)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer

from app.api.errors import ApiError
from app.core.metrics import Metrics
from app.core.settings import Settings
from app.online.worker import FinetuneWorker
from app.serving.inference import InferenceWorker
from app.serving.model_host import ModelHost
from ssd_core.storage.checkpoint import CheckpointStore


def get_settings(request: Request) -> Settings:
    """The settings the application was created with."""
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_host(request: Request) -> ModelHost:
    """The model host; 503 until the lifespan has loaded the model."""
    host = getattr(request.app.state, "host", None)
    if host is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet")
    return host


def get_inference(request: Request) -> InferenceWorker:
    """The inference worker that batches forward passes; 503 until the lifespan has started it."""
    inference = getattr(request.app.state, "inference", None)
    if inference is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet")
    return inference


def get_worker(request: Request) -> FinetuneWorker:
    """The fine-tune worker; 503 where this replica does not train (role `server`) or it stopped."""
    worker = getattr(request.app.state, "worker", None)
    if worker is None or not worker.alive:
        raise ApiError(503, "no_trainer", "this replica runs no trainer (SSD_ROLE=server) or it has stopped")
    return worker


def get_store(request: Request) -> CheckpointStore | None:
    """The checkpoint store (None when SSD_CHECKPOINT_DIR is unset)."""
    return getattr(request.app.state, "store", None)


_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <SSD_API_TOKEN>`")
_basic = HTTPBasic(auto_error=False, description="Label Studio's basic auth: any user, password SSD_API_TOKEN")


def token_matches(settings: Settings, supplied: str) -> bool:
    """Whether `supplied` is SSD_API_TOKEN (compared in constant time); always True when none is configured."""
    if settings.api_token is None:
        return True
    return secrets.compare_digest(supplied.encode(), settings.api_token.get_secret_value().encode())


def require_token(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 unless the request carries the configured Bearer token (no-op when none is configured)."""
    if not token_matches(settings, credentials.credentials if credentials is not None else ""):
        raise ApiError(
            401, "unauthorized",
            "missing or wrong Bearer token: send the header `Authorization: Bearer <SSD_API_TOKEN>` (curl -H "
            "\"Authorization: Bearer $SSD_API_TOKEN\"), the token the server was started with",
            "Authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_basic_token(
    settings: Annotated[Settings, Depends(get_settings)],
    basic: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 unless the request carries SSD_API_TOKEN as HTTP Basic password (Label Studio's only way to
    authenticate to a backend) or Bearer token (no-op when none is configured)."""
    supplied = basic.password if basic is not None else bearer.credentials if bearer is not None else ""
    if not token_matches(settings, supplied):
        raise ApiError(401, "unauthorized", "Label Studio must send HTTP Basic auth with SSD_API_TOKEN as the "
                       "password (the ML backend's \"Use basic auth\" fields; any user name)", "Authorization",
                       headers={"WWW-Authenticate": 'Basic realm="ssd-service"'})


def require_trainer_role(settings: Annotated[Settings, Depends(get_settings)]) -> None:
    """409 `wrong_role` on a server replica: fine-tune jobs, checkpoints and rollbacks live on the trainer.

    A 4xx, not a 503: retrying the same replica can never succeed, the request must go to the trainer.
    """
    if settings.role == "server":
        raise ApiError(409, "wrong_role", "this replica runs with SSD_ROLE=server and only serves inference; "
                       "send fine-tune jobs and model changes to the trainer (SSD_ROLE=trainer)")


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
HostDep = Annotated[ModelHost, Depends(get_host)]
InferenceDep = Annotated[InferenceWorker, Depends(get_inference)]
WorkerDep = Annotated[FinetuneWorker, Depends(get_worker)]
StoreDep = Annotated[CheckpointStore | None, Depends(get_store)]
Authorized = Depends(require_token)
TrainerRole = Depends(require_trainer_role)
