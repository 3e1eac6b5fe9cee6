"""The validation set: `POST /validation` (JSON or multipart, like `/finetune`), `GET`, `DELETE`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from app.api.deps import Authorized, SettingsDep, TrainerRole, WorkerDep
from app.api.inputs import JSON, MULTIPART, labelled_request
from app.api.openapi import (
    AUTH_RESPONSES,
    ERROR_RESPONSES,
    ROLE_RESPONSES,
    VALIDATION_MULTIPART,
    request_body,
)
from app.api.schemas import ValidationAdded, ValidationOptions, ValidationRequest, ValidationView

# the set lives in the trainer's checkpoint directory: a server replica answers 409 wrong_role
router = APIRouter(prefix="/validation", tags=["validation"], dependencies=[TrainerRole], responses=ROLE_RESPONSES)


@router.post(
    "",
    response_model=ValidationAdded,
    dependencies=[Authorized],
    responses={**ERROR_RESPONSES, **AUTH_RESPONSES},
    openapi_extra=request_body({JSON: ValidationRequest, MULTIPART: VALIDATION_MULTIPART}),
    summary="Add labelled images to the validation set",
)
async def add_images(request: Request, worker: WorkerDep, settings: SettingsDep) -> ValidationAdded:
    """The images are never trained on. The set is bounded (SSD_VALIDATION_MAX_IMAGES, _MAX_BYTES):
    once full, reservoir sampling keeps it a uniform sample of every image it was offered."""
    _, items, samples = await labelled_request(request, ValidationOptions, ValidationRequest, settings)
    validation = worker.validation
    pairs = [(image, sample) for (image, _), sample in zip(items, samples, strict=True)]
    added = await run_in_threadpool(validation.add, pairs, {"source": "POST /validation"})  # fsyncs
    worker.metrics.validation_images.set(len(validation))
    description = await run_in_threadpool(validation.describe)
    return ValidationAdded(added=added.added, dropped=added.dropped, replaced=added.replaced,
                           images=description["images"], hash=description["hash"])


@router.get("", response_model=ValidationView, summary="The validation set: images, boxes per class, bytes, hash")
async def describe(worker: WorkerDep) -> ValidationView:
    return ValidationView(**await run_in_threadpool(worker.validation.describe))


@router.delete("", response_model=ValidationView, dependencies=[Authorized], responses=AUTH_RESPONSES,
               summary="Empty the validation set")
async def clear(worker: WorkerDep) -> ValidationView:
    await run_in_threadpool(worker.validation.clear)
    worker.metrics.validation_images.set(0)
    return ValidationView(**await run_in_threadpool(worker.validation.describe))
