"""The native API's routes: a generation's life (start, status, cancel, events, images,
trajectory) and the service's probes (/healthz, /readyz, /metrics).

Handlers only translate between HTTP and jobs.py / sse.py; errors become responses in errors.py
alone. Every Redis round trip of a request is bounded (socket timeouts, plus a deadline:
deps.bounded), so a Redis outage answers 503 within 2 s. The list of a caller's generations and
`Prefer: wait=N` are in generations.py, continue in steering_api.py; api.py puts them together.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from strokes.service.api import errors, jobs, sse
from strokes.service.api import job_list as generations
from strokes.service.api.auth import OwnerDep
from strokes.service.api.deps import (
    COMMON,
    BlobsDep,
    MetricsDep,
    OptionalStr,
    StoreDep,
    bounded,
    error_responses,
)
from strokes.service.api.errors import NotFound, Unavailable
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.steering import steering
from strokes.service.queue.store import Store
from strokes.service.schemas import ErrorResponse, GenerationRequest, Health, Job, Readiness
from strokes.service.shared import images as imagelib
from strokes.service.shared.settings import SettingsDep
from strokes.service.shared.wire import IMAGE_FIELD_PREFIX, IMAGE_ID, TRAJECTORY_FIELD

log = logging.getLogger("strokes.api")

router = APIRouter()

EVENTS_DESCRIPTION = """Server-Sent Events of one generation. `id:` is the event id (resume with the
`Last-Event-ID` header or `?after=`: every later event comes exactly once, in order), `event:` its
name, `data:` a JSON object with `job_id`, `attempt` and, for events of the pipeline, `ts` (when the
worker produced it). A comment opens the stream and another follows every 15 s; the stream ends
after the terminal event (exactly one per job: job.completed, job.failed or job.canceled).

| event | data |
|---|---|
| job.queued | position; on a hand-back or retry: reason (and error) |
| job.started | worker, attempt, takeover (true when it took over from a dead worker) |
| stage.started | iteration, stage (plan, draft, reflect, refine) |
| text.delta | iteration, stage, delta |
| image.progress | iteration, stage, step, steps (preview: an image link, with preview_every) |
| stage.completed | iteration, stage, seconds, text, verdict, refine_instruction, image {id, url, width, height}, steps, prefilled_tokens, cached_tokens, generated_tokens |
| iteration.completed | iteration, verdict, image |
| job.completed | final_image, iterations, timings, usage |
| job.failed | error {type, message} |
| job.canceled | (a pause that expired: reason pause_expired, error) |
| job.paused | iteration, stage, text, expires_at: the job waits (status paused) for continue or cancel |
| job.resumed | iteration, stage, edited: continued, queued again |
| error | error {type, message}: the event store failed; reconnect with Last-Event-ID |
| gap | after, next, message: events after your cursor were trimmed; the stream goes on from `next` (no `id:`) |

A cursor (`Last-Event-ID` or `?after=`) is `0` or `<ms>-<seq>` with each part at most 2^64-1;
anything else is a 422. A cursor ahead of the job's last event gets the stream's end, and nothing
before it.
"""


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
    idempotency_key: Annotated[
        OptionalStr,
        Header(
            pattern=jobs.IDEMPOTENCY_KEY.pattern,
            description="retrying with the same key and body returns the same job",
        ),
    ] = None,
    prefer: Annotated[
        OptionalStr,
        Header(description="`wait=N`: answer 200 with the finished job if it ends within N seconds"),
    ] = None,
) -> Job:
    try:
        job, replayed = await jobs.submit(
            store, settings, owner, body, idempotency_key, deadline_s=settings.redis_deadline_s, blobs=blobs
        )
    except (errors.QueueFull, errors.QuotaExceeded) as exc:
        metrics.rejections.labels(exc.type).inc()
        raise
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        metrics.submitted.inc()
    response.headers["Location"] = job.links.self
    wait_s = generations.prefer_wait(prefer, settings)
    if wait_s is not None:
        response.headers["Preference-Applied"] = f"wait={wait_s:g}"
        response.headers["Vary"] = "Prefer"
        if JobStatus(job.status).terminal or await generations.wait_terminal(store, job.id, wait_s):
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
    job_id: str, response: Response, store: StoreDep, settings: SettingsDep, owner: OwnerDep, blobs: BlobsDep
) -> Job:
    async def work() -> str:
        job = await jobs.find(store, job_id, owner)
        if job["status"] == JobStatus.paused.value and await steering(store).cancel_paused(job_id):
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
    "/v1/generations/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "Server-Sent Events: id = event id, event = name, data = JSON",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        204: {"description": "the job has finished and no events remain after the given id"},
        **error_responses(*COMMON),
    },
    summary="The generation's events (SSE)",
    description=EVENTS_DESCRIPTION,
)
async def generation_events(
    job_id: str,
    store: StoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
    metrics: MetricsDep,
    request: Request,
    last_event_id: Annotated[
        OptionalStr, Header(pattern=sse.CURSOR.pattern, description="resume after this event id")
    ] = None,
    after: Annotated[
        OptionalStr, Query(pattern=sse.CURSOR.pattern, description="resume after this event id")
    ] = None,
):
    if last_event_id is not None:
        cursor = sse.parse_cursor(last_event_id, "Last-Event-ID")
    else:
        cursor = sse.parse_cursor(after or "0", "after")

    async def check() -> sse.Resume | None:
        job = await jobs.find(store, job_id, owner)
        resume = await sse.resume_point(store, job_id, cursor)
        if JobStatus(job["status"]).terminal and not await store.read_events(
            job_id, resume.read_from, count=1
        ):
            return None
        return resume

    resume = await bounded(settings, check())
    if resume is None:
        return Response(status_code=204)
    state = request.app.state
    # Checked and taken in one step (no await between): the cap holds under any concurrency.
    if state.open_streams >= settings.sse_max_streams:
        raise Unavailable("too many open event streams; retry shortly")
    state.open_streams += 1
    return EventSourceResponse(
        _counted(request, sse.events(state.hub, job_id, resume, settings, metrics)),
        ping=settings.sse_ping_s,
        send_timeout=settings.sse_send_timeout_s,
    )


async def _counted(request: Request, stream):
    """The stream's slot (taken by the route) is given back when the stream ends."""
    try:
        async for item in stream:
            yield item
    finally:
        request.app.state.open_streams -= 1


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
    format: Annotated[OptionalStr, Query(pattern="^(png|jpeg|webp)$")] = None,
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


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Readiness: Redis reachable and (by default) a live worker",
)
async def readyz(store: StoreDep, settings: SettingsDep):
    try:
        workers = await bounded(settings, _ready_probe(store))
        redis_ok = True
    except (RedisError, OSError, TimeoutError):
        workers, redis_ok = 0, False
    reason = None
    if not redis_ok:
        reason = "redis unreachable"
    elif settings.ready_requires_worker and workers == 0:
        reason = "no live worker"
    body = Readiness(
        status="ready" if reason is None else "not_ready", redis=redis_ok, workers=workers, reason=reason
    )
    return JSONResponse(body.model_dump(), status_code=200 if reason is None else 503)


async def _ready_probe(store: Store) -> int:
    await store.r.ping()
    return await store.live_workers()


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics_endpoint(store: StoreDep, settings: SettingsDep, metrics: MetricsDep) -> Response:
    try:
        stats = await bounded(settings, store.queue_stats())
        metrics.queue_depth.set(stats.depth)
        metrics.queue_pending.set(stats.pending)
        metrics.workers_alive.set(stats.workers)
        if stats.lag is not None:
            metrics.queue_lag.set(stats.lag)
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("queue metrics unavailable: %s", exc)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
