"""The job's event stream as Server-Sent Events, fanned out from one Redis reader per job.

The SSE `id:` of every event is its Redis stream entry id, so a client that reconnects with
`Last-Event-ID` (or `?after=`) gets exactly the events after it, in order, once each: XREAD from
an id is exclusive. The stream opens with a comment (headers and first bytes reach the client and
any proxy at once), sse-starlette adds a comment every 15 s, and the stream ends right after the
terminal event. If Redis fails mid-stream the client gets an `error` event and the stream ends;
it resumes later from its last id. If the job itself vanishes (its hash expired, or a Redis
without persistence restarted) the stream ends with an `error` event of type `job_gone`, never in
silence.

`EventHub` (one per API process) keeps one `Feed` per job that has clients: a task that reads the
job's events from Redis once, encodes them once, and hands the same bytes to every subscriber.
A client that resumes from further back first catches up with its own reads, then joins the
feed, dropping what it has already sent: ids decide, so nothing is sent twice or skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sse_starlette import ServerSentEvent

from strokes.service.api.errors import InvalidRequest, error_body
from strokes.service.api.metrics import ApiMetrics
from strokes.service.queue import keys
from strokes.service.queue.client import TRANSIENT
from strokes.service.queue.results import Event
from strokes.service.queue.store import Store
from strokes.service.shared.settings import Settings
from strokes.service.shared.wire import TERMINAL_EVENTS

log = logging.getLogger("strokes.sse")

CURSOR = re.compile(r"^(0|\d{1,20}-\d{1,20})$")
MAX_ID_PART = 2**64 - 1  # Redis stream ids are two unsigned 64-bit numbers
GAP = "gap"
JOB_GONE = "job_gone"  # an `error` event's type: the job vanished; reconnecting would answer 404


def _key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def parse_cursor(value: str, param: str) -> str:
    """A client's cursor, or InvalidRequest (422): `0` or `<ms>-<seq>`, each part <= 2^64-1."""
    if not CURSOR.match(value) or any(part > MAX_ID_PART for part in _key(value)):
        raise InvalidRequest(
            f"{param} must be 0 or an event id <ms>-<seq> (each part at most {MAX_ID_PART})", param=param
        )
    return value


@dataclass(frozen=True)
class Resume:
    """Where a client's stream starts. `cursor`: the client's own (only later ids are sent);
    `read_from`: where reading starts (the cursor, or the stream's last id when the cursor is
    ahead of it, so a shared reader never waits beyond the stream); `gap`: the first kept event
    when events after the cursor were trimmed away."""

    cursor: str
    read_from: str
    gap: str | None = None


async def resume_point(store: Store, job_id: str, cursor: str) -> Resume:
    info = await store.stream_info(job_id)
    if info is None:
        return Resume(cursor, cursor)
    first, last, trimmed = info
    read_from = last if _key(cursor) > _key(last) else cursor
    gap = first if trimmed and _key(cursor) < _key(first) else None
    return Resume(cursor, read_from, gap)


def gap_event(job_id: str, resume: Resume) -> ServerSentEvent:
    """The documented notice for a resume from before the oldest kept event (no `id:`, so the
    client's Last-Event-ID stays its own)."""
    data = {
        "job_id": job_id,
        "after": resume.cursor,
        "next": resume.gap,
        "message": "events after your cursor were trimmed from the job's log; the stream goes on from "
        "the oldest kept event. GET the job for its current state.",
    }
    return ServerSentEvent(data=json.dumps(data), event=GAP)


def encode(events: list[Event], links: Callable[[Event], Event] | None = None) -> bytes:
    """`links`: the blob store's rewrite of image links (presigned URLs), or None."""
    if links is not None:
        events = [links(e) for e in events]
    return b"".join(ServerSentEvent(data=e.data, event=e.name, id=e.id).encode() for e in events)


@dataclass(frozen=True)
class Chunk:
    """Events read from Redis in one go, already encoded for the wire."""

    events: list[Event]
    data: bytes

    @property
    def terminal(self) -> bool:
        return self.events[-1].name in TERMINAL_EVENTS


class _End:
    """The feed is over: the job finished (or expired) with nothing more to read."""


class _Failed:
    """Redis failed under the feed."""


class _Gone:
    """The job vanished under the feed: its hash is gone without a terminal event in its log
    (expired while the client waited, or a Redis without persistence restarted)."""


class Feed:
    HISTORY_EVENTS = 20000  # chunks kept for clients that join late (a job's whole log, usually)

    def __init__(self, hub: EventHub, job_id: str, cursor: str):
        self.hub, self.job_id, self.cursor = hub, job_id, cursor
        self.start = cursor  # history holds every event after this id
        self.history: list[Chunk] = []
        self.history_events = 0
        self.subscribers: set[asyncio.Queue] = set()
        self.done = False
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"feed-{job_id}")

    def _close(self, last: object | None) -> None:
        # Synchronous (no await): a subscriber arriving after this creates a fresh feed.
        self.done = True
        if self.hub.feeds.get(self.job_id) is self:
            del self.hub.feeds[self.job_id]
        if last is not None:
            for queue in self.subscribers:
                queue.put_nowait(last)

    def _remember(self, chunk: Chunk) -> None:
        self.history.append(chunk)
        self.history_events += len(chunk.events)
        while self.history_events > self.HISTORY_EVENTS and len(self.history) > 1:
            dropped = self.history.pop(0)
            self.history_events -= len(dropped.events)
            self.start = dropped.events[-1].id

    async def _run(self) -> None:
        store, settings = self.hub.store, self.hub.settings
        try:
            while self.subscribers:
                batch = await store.read_events(
                    self.job_id, self.cursor, count=200, block_ms=settings.sse_block_ms
                )
                if not batch:
                    status = await store.r.hget(keys.job(self.job_id), "status")
                    if status is not None and status.decode() in ("queued", "running", "paused"):
                        continue
                    # Finished (or gone): read once more, since the terminal event may have
                    # landed between the blocking read and the status check.
                    batch = await store.read_events(self.job_id, self.cursor, count=200)
                    if not batch:
                        return self._close(_End() if status is not None else _Gone())
                for start in range(0, len(batch), 200):
                    part = batch[start : start + 200]
                    chunk = Chunk(part, encode(part, self.hub.links))
                    self.cursor = part[-1].id
                    self._remember(chunk)
                    for queue in self.subscribers:
                        queue.put_nowait(chunk)
                if batch[-1].name in TERMINAL_EVENTS:
                    return self._close(None)
            self._close(None)
        except TRANSIENT as exc:
            log.warning("event feed of %s interrupted: %s", self.job_id, exc)
            self._close(_Failed())
        except asyncio.CancelledError:
            self._close(_Failed())
            raise
        finally:
            if not self.done:
                self._close(_Failed())


class EventHub:
    """One per API process: the feeds of the jobs that have clients. `links`: the blob store's
    rewrite of image links in events (presigned URLs), or None."""

    def __init__(self, store: Store, settings: Settings, links: Callable[[Event], Event] | None = None):
        self.store, self.settings, self.links = store, settings, links
        self.feeds: dict[str, Feed] = {}

    def subscribe(self, job_id: str, cursor: str) -> tuple[Feed, asyncio.Queue, bool]:
        """(feed, queue of chunks, whether the client must first catch up with its own reads).

        A client resuming at or after the feed's start gets the feed's history from memory; one
        from further back reads Redis itself first. Either way the queue then brings everything
        the feed reads from now on; the client drops ids it has already sent."""
        feed = self.feeds.get(job_id)
        if feed is None or feed.done:
            feed = self.feeds[job_id] = Feed(self, job_id, cursor)
        queue: asyncio.Queue = asyncio.Queue()
        catch_up = _key(cursor) < _key(feed.start)
        if not catch_up:
            for chunk in feed.history:
                queue.put_nowait(chunk)
        feed.subscribers.add(queue)
        return feed, queue, catch_up

    async def close(self) -> None:
        for feed in list(self.feeds.values()):
            feed.task.cancel()


def _error_event() -> bytes:
    body = error_body(
        "service_unavailable", "the event store is unreachable; reconnect with Last-Event-ID to resume"
    )
    return ServerSentEvent(data=json.dumps(body), event="error").encode()


def _gone_event(job_id: str) -> bytes:
    """The stream's explicit end when its job vanished: never a silent close."""
    body = error_body(
        JOB_GONE,
        f"the job {job_id} is no longer in the store (it expired, or the store lost it in a restart) "
        "and its log has no terminal event; GET /v1/generations/{id} answers 404",
    )
    return ServerSentEvent(data=json.dumps(body), event="error").encode()


async def events(
    hub: EventHub, job_id: str, resume: Resume, settings: Settings, metrics: ApiMetrics
) -> AsyncIterator[ServerSentEvent | bytes]:
    metrics.sse_streams.inc()
    cursor = resume.read_from
    feed, queue, catch_up = hub.subscribe(job_id, cursor)
    try:
        yield ServerSentEvent(comment="stream open", retry=settings.sse_retry_ms)
        if resume.gap is not None:
            yield gap_event(job_id, resume)
        last = _key(resume.cursor)
        if catch_up:  # from before what the shared reader holds: read on our own first
            while True:
                try:
                    batch = await hub.store.read_events(job_id, cursor, count=500)
                except TRANSIENT:
                    yield _error_event()
                    return
                if not batch:
                    break
                cut = next((i + 1 for i, e in enumerate(batch) if e.name in TERMINAL_EVENTS), len(batch))
                yield encode(batch[:cut], hub.links)
                cursor, last = batch[cut - 1].id, _key(batch[cut - 1].id)
                if cut < len(batch) or batch[cut - 1].name in TERMINAL_EVENTS:
                    return
        while True:
            items = [await queue.get()]
            while not queue.empty():  # a client that fell behind gets what piled up in one write
                items.append(queue.get_nowait())
            out: list[bytes] = []
            ended = False
            for item in items:
                if isinstance(item, _End):
                    ended = True
                    break
                if isinstance(item, _Failed):
                    out.append(_error_event())
                    ended = True
                    break
                if isinstance(item, _Gone):
                    out.append(_gone_event(job_id))
                    ended = True
                    break
                events = item.events
                fresh = events if _key(events[0].id) > last else [e for e in events if _key(e.id) > last]
                if fresh:
                    out.append(item.data if fresh is events else encode(fresh, hub.links))
                    last = _key(fresh[-1].id)
                if item.terminal:  # the job's last event, even one at or before the cursor
                    ended = True
                    break
            if out:
                yield b"".join(out)
            if ended:
                return
    finally:
        feed.subscribers.discard(queue)
        metrics.sse_streams.dec()
