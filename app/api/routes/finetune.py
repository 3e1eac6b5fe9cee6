"""Fine-tune jobs: `POST /finetune` (JSON or multipart), `GET`/`DELETE /finetune/{job_id}`."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import Authorized, SettingsDep, TrainerRole, WorkerDep
from app.api.errors import ErrorResponse
from app.api.inputs import JSON, MULTIPART, labelled_request
from app.api.openapi import AUTH_RESPONSES, ERROR_RESPONSES, FINETUNE_MULTIPART, ROLE_RESPONSES, request_body
from app.api.schemas import FinetuneOptions, FinetuneRequest
from app.online.job_view import JobView

# jobs live on the trainer: a server replica answers 409 wrong_role to every route here
router = APIRouter(prefix="/finetune", tags=["finetune"], dependencies=[TrainerRole], responses=ROLE_RESPONSES)

_QUEUE_RESPONSES = {429: {"model": ErrorResponse, "description": "The fine-tune queue is full"}}


@router.post(
    "",
    status_code=202,
    response_model=JobView,
    dependencies=[Authorized],
    responses={**ERROR_RESPONSES, **AUTH_RESPONSES, **_QUEUE_RESPONSES, 200: {"model": JobView,
               "description": "?wait=true: the finished job"}},
    openapi_extra=request_body({JSON: FinetuneRequest, MULTIPART: FINETUNE_MULTIPART}),
    summary="Queue a fine-tune job on labelled images",
)
async def submit_job(request: Request, worker: WorkerDep, settings: SettingsDep, wait: bool = False) -> JSONResponse:
    """Images with pixel boxes train the hosted model for `steps` steps; 202 with the queued job, or
    with `?wait=true` 200 with the job once it has finished (after the publish gate's decision)."""
    options, items, samples = await labelled_request(request, FinetuneOptions, FinetuneRequest, settings)
    # off the event loop: acceptance fsyncs the job journal
    job = await run_in_threadpool(worker.submit, samples, [image for image, _ in items], options.steps,
                                  options.learning_rate, options.augment, options.force, options.replay)
    if wait:
        await asyncio.shield(asyncio.wrap_future(job.finished))  # a client hang-up leaves the job running
        return JSONResponse(job.view().model_dump(mode="json"), status_code=200)
    return JSONResponse(job.view().model_dump(mode="json"), status_code=202)


@router.get("/{job_id}", response_model=JobView, responses={404: {"model": ErrorResponse}}, summary="A job's state")
async def get_job(job_id: str, worker: WorkerDep) -> JobView:
    return worker.get(job_id).view()


@router.delete(
    "/{job_id}",
    response_model=JobView,
    dependencies=[Authorized],
    responses={**AUTH_RESPONSES, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
    summary="Cancel a job (a running one stops after its current step)",
)
async def cancel_job(job_id: str, worker: WorkerDep) -> JobView:
    return (await run_in_threadpool(worker.cancel, job_id)).view()  # fsyncs the journal
