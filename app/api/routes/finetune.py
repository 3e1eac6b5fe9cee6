"""Fine-tune jobs: `POST /finetune` (JSON or multipart), `GET /finetune` (the list), `GET`/`DELETE /finetune/{job_id}`."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import Authorized, SettingsDep, TrainerRole, WorkerDep
from app.api.errors import ErrorResponse
from app.api.inputs import JSON, MULTIPART, labelled_request
from app.api.openapi import AUTH_RESPONSES, ERROR_RESPONSES, FINETUNE_MULTIPART, ROLE_RESPONSES, request_body
from app.api.schemas import FinetuneOptions, FinetuneRequest, JobList
from app.online.job_view import JobSource, JobState, JobView

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
                                  options.learning_rate, "ssd" if options.augment else None, options.force,
                                  options.replay)
    if wait:
        await asyncio.shield(asyncio.wrap_future(job.finished))  # a client hang-up leaves the job running
        return JSONResponse(job.view().model_dump(mode="json"), status_code=200)
    return JSONResponse(job.view().model_dump(mode="json"), status_code=202)


@router.get("", response_model=JobList, responses=ERROR_RESPONSES, summary="The jobs, newest first")
async def list_jobs(
    worker: WorkerDep,
    status: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    source: Annotated[JobSource | None, Query(description="only jobs from this source")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="jobs per page")] = 20,
    offset: Annotated[int, Query(ge=0, description="jobs to skip (the page's start)")] = 0,
) -> JobList:
    """Queued, running and the last SSD_JOB_HISTORY finished jobs, newest first; `source` says who asked
    (`api`: POST /finetune, `label-studio`: the annotation stream, with each image's Label Studio ids)."""
    jobs = worker.jobs(status, source)
    return JobList(jobs=[job.view() for job in jobs[offset : offset + limit]], total=len(jobs), offset=offset,
                   limit=limit)


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
