"""A generation's results: its images (png, jpeg or webp) and its trajectory, from the blob store."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response
from starlette.concurrency import run_in_threadpool

from strokes.service.api import errors, jobs
from strokes.service.api.auth import OwnerDep
from strokes.service.api.deps import (
    COMMON,
    BlobsDep,
    OptionalStr,
    SettingsDep,
    StoreDep,
    bounded,
    error_responses,
)
from strokes.service.api.errors import NotFound
from strokes.service.api.schemas import ErrorResponse
from strokes.service.queue.keys import JobStatus
from strokes.service.shared import images as imagelib
from strokes.service.shared.wire import IMAGE_FIELD_PREFIX, IMAGE_ID, TRAJECTORY_FIELD

router = APIRouter()


def _choose_format(fmt: str | None, accept: str | None) -> str:
    """?format= wins; else the best-rated supported type in Accept; else PNG (an Accept we cannot
    satisfy is disregarded rather than answered 406, as RFC 9110 12.5.1 allows)."""
    if fmt is not None:
        return fmt
    best, best_q = "png", 0.0
    for part in (accept or "").split(","):
        media, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        chosen = OUTPUT_MEDIA.get(media.strip().lower())
        if chosen is not None and q > best_q:
            best, best_q = chosen, q
    return best


OUTPUT_MEDIA = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/webp": "webp",
    "image/*": "png",
    "*/*": "png",
}


@router.get(
    "/v1/generations/{job_id}/images/{image_id}",
    response_class=Response,
    responses={
        200: {"description": "the image", "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        **error_responses(*COMMON),
    },
    summary="An image of the generation (png, jpeg or webp)",
)
async def generation_image(
    job_id: str,
    image_id: str,
    store: StoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
    blobs: BlobsDep,
    format: Annotated[Literal["png", "jpeg", "webp"] | None, Query(description="the image's format")] = None,
    accept: Annotated[OptionalStr, Header()] = None,
) -> Response:
    fmt = _choose_format(format, accept)

    async def work() -> int:
        job = await jobs.find(store, job_id, owner)
        raw = job.get(IMAGE_FIELD_PREFIX + image_id) if IMAGE_ID.match(image_id) else None
        if raw is None:
            raise NotFound("no such image")
        return int(json.loads(raw).get("attempt", 0))

    attempt = await bounded(settings, work())
    png = await blobs.get(imagelib.storage_key(job_id, attempt, image_id))  # bounded by blob_timeout_s
    if png is None:
        raise NotFound("the image has expired")
    body = await run_in_threadpool(imagelib.transcode, png, fmt)
    return Response(
        body,
        media_type=imagelib.OUTPUT_FORMATS[fmt],
        headers={"Cache-Control": "private, max-age=3600", "Vary": "Accept"},
    )


@router.get(
    "/v1/generations/{job_id}/trajectory",
    responses={
        200: {
            "description": "the trajectory: every stage of every iteration (JSON)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        409: {"model": ErrorResponse, "description": "the job has not succeeded (yet)"},
        **error_responses(*COMMON),
    },
    summary="The finished generation's trajectory",
)
async def generation_trajectory(
    job_id: str, store: StoreDep, settings: SettingsDep, owner: OwnerDep, blobs: BlobsDep
) -> Response:
    job = await bounded(settings, jobs.find(store, job_id, owner))
    if job["status"] != JobStatus.succeeded.value:
        raise errors.NotReady(f"the job is {job['status']}; the trajectory comes with success")
    key = job.get(TRAJECTORY_FIELD)  # the blob the finishing attempt wrote (bounded by blob_timeout_s)
    trajectory = await blobs.get(key) if key else None
    if trajectory is None:
        raise NotFound("the trajectory has expired")
    return Response(trajectory, media_type="application/json")
