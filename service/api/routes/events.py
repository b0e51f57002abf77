"""GET /v1/generations/{id}/events: the job's events as Server-Sent Events (service/api/sse.py
fans them out from one Redis reader per job)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from sse_starlette import EventSourceResponse

from strokes.service.api import jobs, sse
from strokes.service.api.auth import OwnerDep
from strokes.service.api.deps import (
    COMMON,
    MetricsDep,
    OptionalStr,
    SettingsDep,
    StoreDep,
    bounded,
    error_responses,
)
from strokes.service.api.errors import Unavailable
from strokes.service.queue.keys import JobStatus

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
| error | error {type, message}: `service_unavailable`, the event store failed (reconnect with Last-Event-ID); `job_gone`, the job vanished from the store without a terminal event (expired, or a restart of a Redis without persistence; GET answers 404) |
| gap | after, next, message: events after your cursor were trimmed; the stream goes on from `next` (no `id:`) |

A cursor (`Last-Event-ID` or `?after=`) is `0` or `<ms>-<seq>` with each part at most 2^64-1;
anything else is a 422. A cursor ahead of the job's last event gets the stream's end, and nothing
before it.
"""


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
    # The form is documented (json_schema_extra) and checked by sse.parse_cursor, whose 422 says
    # it in words naming the field as it was sent (a pattern= here would answer with the regex).
    last_event_id: Annotated[
        OptionalStr,
        Header(description="resume after this event id", json_schema_extra={"pattern": sse.CURSOR.pattern}),
    ] = None,
    after: Annotated[
        OptionalStr,
        Query(description="resume after this event id", json_schema_extra={"pattern": sse.CURSOR.pattern}),
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
