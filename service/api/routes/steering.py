"""The steering route: POST /v1/generations/{id}/continue (service/api/forks.py does the work).

Forks need no route of their own (POST /v1/generations with `fork`); cancel while paused is the
ordinary DELETE.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from strokes.service.api import forks, jobs
from strokes.service.api.auth import OwnerDep
from strokes.service.api.deps import (
    COMMON,
    BlobsDep,
    SettingsDep,
    SteeringDep,
    StoreDep,
    bounded,
    error_responses,
)
from strokes.service.api.schemas import ContinueRequest, Job

router = APIRouter()


@router.post(
    "/v1/generations/{job_id}/continue",
    status_code=202,
    response_model=Job,
    responses=error_responses(*COMMON, 400, 409, 413, 429),
    summary="Continue a paused generation, unchanged or with the paused stage's text replaced",
)
async def continue_generation(
    job_id: str,
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
    blobs: BlobsDep,
    steering: SteeringDep,
    body: ContinueRequest | None = None,
) -> Job:
    """The job goes back to the queue as an ordinary attempt (any worker runs it): it rebuilds the
    context from the stages so far (the stage's text replaced by `text`, when given) and runs on.
    It is admitted like a new job: 429 when the queue is full or the key has its quota of queued
    and running jobs; 422 budget_exceeded when the new text makes the context too long. 409 when
    the job is not paused (of two continues at once, one wins and its text is used)."""

    async def work() -> Job:
        job = await jobs.find(store, job_id, owner)
        await forks.continue_job(store, steering, settings, job, body.text if body else None, blobs)
        response.headers["Location"] = jobs.links(job_id)["self"]
        return await jobs.current_view(store, job_id)

    return await bounded(settings, work())
