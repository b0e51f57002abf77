"""The routes of a generation's life: start (with `Prefer: wait=N`), list, status, cancel.

Handlers only translate between HTTP and the API's job logic (service/api/jobs.py, job_list.py);
errors become responses in service/api/errors.py alone. Every Redis round trip of a request is
bounded (socket timeouts, plus a deadline: deps.bounded), so a Redis outage answers 503 within 2 s.
A generation's events, its images and trajectory, and continue have modules of their own.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from strokes.service.api import errors, jobs
from strokes.service.api.auth import OwnerDep
from strokes.service.api.deps import (
    COMMON,
    BlobsDep,
    MetricsDep,
    OptionalStr,
    SettingsDep,
    SteeringDep,
    StoreDep,
    bounded,
    error_responses,
)
from strokes.service.api.errors import NotFound
from strokes.service.api.job_list import JobList, list_jobs
from strokes.service.api.schemas import ErrorResponse, GenerationRequest, Job
from strokes.service.queue.keys import JobStatus
from strokes.service.shared.settings import Settings

router = APIRouter()


@router.post(
    "/v1/generations",
    status_code=202,
    response_model=Job,
    responses={
        200: {"model": Job, "description": "`Prefer: wait=N` and the job ended within N seconds"},
        **error_responses(400, 401, 413, 415, 422, 429, 503),
    },
    summary="Start a generation",
)
async def create_generation(
    body: GenerationRequest,
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
    metrics: MetricsDep,
    blobs: BlobsDep,
    steering: SteeringDep,
    idempotency_key: Annotated[
        OptionalStr,
        Header(
            description="retrying with the same key and body returns the same job",
            json_schema_extra={"pattern": jobs.IDEMPOTENCY_KEY.pattern},  # checked in words by jobs.submit
        ),
    ] = None,
    prefer: Annotated[
        OptionalStr,
        Header(description="`wait=N`: answer 200 with the finished job if it ends within N seconds"),
    ] = None,
) -> Job:
    try:
        job, replayed = await jobs.submit(
            store,
            steering,
            settings,
            owner,
            body,
            idempotency_key,
            deadline_s=settings.redis_deadline_s,
            blobs=blobs,
        )
    except (errors.QueueFull, errors.QuotaExceeded) as exc:
        metrics.rejections.labels(exc.type).inc()
        raise
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        metrics.submitted.inc()
    response.headers["Location"] = job.links.self
    wait_s = prefer_wait(prefer, settings)
    if wait_s is not None:
        response.headers["Preference-Applied"] = f"wait={wait_s:g}"
        response.headers["Vary"] = "Prefer"
        if JobStatus(job.status).terminal or await jobs.wait_terminal(store, job.id, wait_s):
            response.status_code = 200
            job = await bounded(settings, jobs.current_view(store, job.id, blobs))
    return job


@router.get(
    "/v1/generations/{job_id}",
    response_model=Job,
    responses=error_responses(*COMMON),
    summary="A generation's status and results",
)
async def get_generation(
    job_id: str, store: StoreDep, settings: SettingsDep, owner: OwnerDep, blobs: BlobsDep
) -> Job:
    async def work() -> Job:
        await jobs.find(store, job_id, owner)
        return await jobs.current_view(store, job_id, blobs)

    return await bounded(settings, work())


@router.delete(
    "/v1/generations/{job_id}",
    response_model=Job,
    responses={
        202: {"model": Job, "description": "cancel requested; the job stops at its next step"},
        **error_responses(*COMMON),
    },
    summary="Cancel a generation (idempotent)",
)
async def cancel_generation(
    job_id: str,
    response: Response,
    store: StoreDep,
    steering: SteeringDep,
    settings: SettingsDep,
    owner: OwnerDep,
    blobs: BlobsDep,
) -> Job:
    async def work() -> str:
        job = await jobs.find(store, job_id, owner)
        if job["status"] == JobStatus.paused.value and await steering.cancel_paused(job_id):
            return "canceled"  # a paused job ends at once
        outcome, _ = await store.cancel(job_id)
        if outcome == "missing":
            raise NotFound("no such generation")
        return outcome

    outcome = await bounded(settings, work())
    if outcome == "canceled":  # a queued job ended here (a running one ends in its worker)
        await blobs.job_ended(job_id)
    response.status_code = 202 if outcome == "canceling" else 200
    return await bounded(settings, jobs.current_view(store, job_id, blobs))


@router.get(
    "/v1/generations",
    response_model=JobList,
    responses={code: {"model": ErrorResponse} for code in (401, 422, 503)},
    summary="The caller's generations, newest first",
    description="Cursor pagination: pass `next_cursor` as `after` for the next page. Only the "
    "caller's jobs (those of its API key) are listed; expired jobs drop out.",
)
async def list_generations(
    settings: SettingsDep,
    owner: OwnerDep,
    store: StoreDep,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="jobs per page")] = 20,
    after: Annotated[str | None, Query(max_length=64, description="next_cursor of the previous page")] = None,
) -> JobList:
    work = list_jobs(store, owner, status=status.value if status else None, limit=limit, after=after)
    return await bounded(settings, work)


# ---- Prefer: wait=N -----------------------------------------------------------------------------

_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d{1,6})\"?", re.IGNORECASE)


def prefer_wait(header: str | None, settings: Settings) -> float | None:
    """Seconds to wait from a Prefer header (`wait=N`), capped by settings; None when absent."""
    if not header:
        return None
    match = _WAIT.search(header)
    if match is None:
        return None
    return min(float(match.group(1)), settings.prefer_wait_max_s)
