"""The job's event stream as Server-Sent Events.

The SSE `id:` of every event is its Redis stream entry id, so a client that reconnects with
`Last-Event-ID` (or `?after=`) gets exactly the events after it, in order, once each: XREAD from
an id is exclusive. The stream opens with a comment (headers and first bytes reach the client and
any proxy at once), sse-starlette adds a comment every 15 s, and the stream ends right after the
terminal event. If Redis fails mid-stream the client gets an `error` event and the stream ends;
it resumes later from its last id.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator

from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent

from service import keys
from service.errors import error_body
from service.metrics import ApiMetrics
from service.settings import Settings
from service.store import Store
from service.wire import TERMINAL_EVENTS

log = logging.getLogger("strokes.sse")

CURSOR = re.compile(r"^(0|\d{1,20}-\d{1,20})$")


async def events(
    store: Store, job_id: str, cursor: str, settings: Settings, metrics: ApiMetrics
) -> AsyncIterator[ServerSentEvent]:
    metrics.sse_streams.inc()
    try:
        yield ServerSentEvent(comment="stream open", retry=settings.sse_retry_ms)
        while True:
            try:
                batch = await store.read_events(job_id, cursor, count=200, block_ms=settings.sse_block_ms)
                if not batch:
                    status = await store.r.hget(keys.job(job_id), "status")
                    if status is not None and status.decode() in ("queued", "running"):
                        continue
                    # Finished (or expired): read once more, since the terminal event may have
                    # landed between the blocking read and the status check.
                    batch = await store.read_events(job_id, cursor, count=200)
                    if not batch:
                        return
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("event stream of %s interrupted: %s", job_id, exc)
                body = error_body(
                    "service_unavailable",
                    "the event store is unreachable; reconnect with Last-Event-ID to resume",
                )
                yield ServerSentEvent(data=json.dumps(body), event="error")
                return
            for event in batch:
                yield ServerSentEvent(data=event.data, event=event.name, id=event.id)
                cursor = event.id
                if event.name in TERMINAL_EVENTS:
                    return
    finally:
        metrics.sse_streams.dec()
