"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import MetricsDep, SettingsDep
from app.api.errors import ApiError
from app.api.openapi import ERROR_RESPONSES
from app.api.schemas import Health
from app.core.metrics import exposition

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: ERROR_RESPONSES[503]},
            summary="The model is loaded, and the trainer thread alive (SSD_ROLE all/trainer) or the trainer's "
                    "checkpoint loaded (SSD_ROLE=server)")
async def readyz(request: Request, settings: SettingsDep) -> Health:
    state = request.app.state
    if getattr(state, "host", None) is None:
        raise ApiError(503, "not_ready", "the model is not loaded")
    worker = getattr(state, "worker", None)
    if settings.role != "server" and (worker is None or not worker.alive):
        raise ApiError(503, "not_ready", "the trainer thread is not running")
    watcher = getattr(state, "watcher", None)
    if watcher is not None and not watcher.synced:  # serving a local initialisation, not a published version
        raise ApiError(503, "not_ready", "waiting for the trainer's first checkpoint in SSD_CHECKPOINT_DIR")
    return Health(status="ready", detail=f"model version {state.host.current.version}")


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text format)",
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(metrics: MetricsDep) -> Response:
    return Response(exposition(metrics), media_type=CONTENT_TYPE_LATEST)
