"""The hosted model: `GET /model`, `GET /model/versions`, `GET /model/export`, `POST /model/checkpoint`,
`POST /model/rollback`, `POST`/`DELETE /model/versions/{version}/pin`."""

from __future__ import annotations

import shutil
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from app.api.deps import Authorized, HostDep, SettingsDep, StoreDep, TrainerRole, WorkerDep
from app.api.errors import ApiError, ErrorResponse
from app.api.openapi import AUTH_RESPONSES
from app.api.schemas import (
    CheckpointResponse,
    LostVersions,
    ModelInfo,
    PinResponse,
    RollbackRequest,
    VersionInfo,
    VersionsResponse,
)
from app.core.errors import describe
from app.core.settings import Settings
from app.serving.export import export_served
from app.serving.model_host import ModelHost
from app.serving.saved_versions import intact_versions

router = APIRouter(prefix="/model", tags=["model"])

_CONFLICT = {409: {"model": ErrorResponse, "description": "Trainer busy, no checkpoint directory, or a server replica"}}


def model_info(host: ModelHost, settings: Settings) -> ModelInfo:
    current = host.current
    return ModelInfo(
        architecture=settings.model,
        num_classes=settings.num_classes,
        priors=host.spec.prior_set,
        class_names=settings.object_class_names(),
        input_size=host.spec.image_size,
        num_priors=host.priors.shape[0],
        version=current.version,
        training_steps=current.step,
        device=str(host.device),
        backend=current.backend,
        role=settings.role,
        restored_from=current.restored_from,
    )


@router.get("", response_model=ModelInfo, summary="Architecture, classes, input size, version, device")
async def get_model(host: HostDep, settings: SettingsDep) -> ModelInfo:
    return model_info(host, settings)


@router.get("/versions", response_model=VersionsResponse, summary="The current version and the saved ones")
async def list_versions(host: HostDep, store: StoreDep) -> VersionsResponse:
    """Only checkpoints that verify (size and sha256 of each file) are listed: each one is a valid
    `POST /model/rollback` target. A torn or corrupt checkpoint is left out. `lost` lists the numbers a
    crash took before their checkpoints were written (on a server replica: empty, the trainer's own)."""
    saved = await run_in_threadpool(intact_versions, store) if store is not None else []
    pins = await run_in_threadpool(store.pinned) if store is not None else set()
    return VersionsResponse(
        current=host.current.version,
        versions=[VersionInfo(version=i.version, step=i.step, created=i.created, pinned=i.version in pins)
                  for i in saved],
        lost=[LostVersions(first=first, last=last) for first, last in host.numbers.lost],
    )


@router.get(
    "/export",
    response_class=FileResponse,
    dependencies=[Authorized],
    responses={**AUTH_RESPONSES, 200: {"content": {"application/octet-stream": {}},
                                       "description": "The exported file (`X-Model-Version` names the version)"}},
    summary="Download the served version as ONNX or TorchScript",
)
async def export(
    host: HostDep, settings: SettingsDep,
    fmt: Annotated[Literal["onnx", "torchscript"], Query(alias="format")] = "onnx",
) -> FileResponse:
    """The network on normalised images [B, 3, S, S] (dynamic B) -> `loc`, `conf` and the constant `priors`,
    with the preprocessing and decoding metadata inside the file (docs/api.md, "Export")."""
    path, version = await run_in_threadpool(export_served, host, settings, fmt)
    return FileResponse(
        path, media_type="application/octet-stream", filename=path.name, headers={"X-Model-Version": str(version)},
        background=BackgroundTask(shutil.rmtree, path.parent, ignore_errors=True),
    )


_PIN_RESPONSES = {**AUTH_RESPONSES, **_CONFLICT, 404: {"model": ErrorResponse, "description": "No such saved version"}}


@router.post("/versions/{version}/pin", response_model=PinResponse, dependencies=[TrainerRole, Authorized],
             responses=_PIN_RESPONSES, summary="Protect a saved version from pruning")
async def pin_version(version: int, worker: WorkerDep) -> PinResponse:
    """A pinned checkpoint is kept beyond SSD_CHECKPOINT_KEEP until unpinned; pins survive restarts."""
    pins = await run_in_threadpool(worker.pin, version, True)
    return PinResponse(version=version, pinned=True, pins=sorted(pins))


@router.delete("/versions/{version}/pin", response_model=PinResponse, dependencies=[TrainerRole, Authorized],
               responses=_PIN_RESPONSES, summary="Let a pinned version be pruned again")
async def unpin_version(version: int, worker: WorkerDep) -> PinResponse:
    pins = await run_in_threadpool(worker.pin, version, False)
    return PinResponse(version=version, pinned=False, pins=sorted(pins))


@router.post(
    "/checkpoint",
    response_model=CheckpointResponse,
    dependencies=[TrainerRole, Authorized],
    responses={**AUTH_RESPONSES, **_CONFLICT, 503: {"model": ErrorResponse, "description": "The write failed"}},
    summary="Save the current version now",
)
async def save_checkpoint(worker: WorkerDep) -> CheckpointResponse:
    """200 once the current version is on disk: `written` says whether this request wrote it or it was
    already there; a failed write is a 503 (the served model is unaffected)."""
    try:
        info, written = await run_in_threadpool(worker.checkpoint)
    except OSError as error:  # read-only or full disk: counted, the served model is unaffected
        raise ApiError(503, "checkpoint_failed", f"checkpoint write failed: {describe(error)}") from None
    return CheckpointResponse(version=info.version, step=info.step, created=info.created, saved=True,
                              written=written)


@router.post(
    "/rollback",
    response_model=ModelInfo,
    dependencies=[TrainerRole, Authorized],
    responses={**AUTH_RESPONSES, **_CONFLICT, 404: {"model": ErrorResponse, "description": "No such saved version"}},
    summary="Serve a saved version's weights again, as a new version number",
)
async def rollback(body: RollbackRequest, worker: WorkerDep, host: HostDep, settings: SettingsDep) -> ModelInfo:
    """Versions only grow: the restored weights are checkpointed as the next version, then published,
    with `restored_from` naming the saved one, so a restart resumes from them. All or nothing: on any
    failure (503 `checkpoint_failed` when the disk refuses the write, 500 `rollback_failed` otherwise) the
    served version, the trainer and its optimizer are as before."""
    try:
        await run_in_threadpool(worker.rollback, body.version)
    except OSError as error:
        raise ApiError(503, "checkpoint_failed", f"not rolled back, version {host.current.version} is still "
                       f"served: the checkpoint write failed: {describe(error)}") from None
    return model_info(host, settings)
