"""Publishing one attempt's events: the job being run (ActiveJob), text-delta coalescing
(DeltaBuffer), the lease-checked write of an attempt's blobs (AttemptBlobs) and the Publisher that
writes events off the pipeline's thread under the attempt's fence. Every write of a running job
goes through `through_outage`, which retries it through a Redis outage. The job runner (runner.py)
builds these; nothing here runs the pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from strokes.model.spec.events import TextDelta
from strokes.service.blobs.store import BlobStore
from strokes.service.queue.client import TRANSIENT
from strokes.service.queue.store import Store
from strokes.service.shared import images as imagelib
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.wire import TRAJECTORY_FIELD
from strokes.service.worker.metrics import WorkerMetrics
from strokes.service.worker.translate import Translator, Wire

log = logging.getLogger("strokes.worker")
T = TypeVar("T")


async def through_outage(op: Callable[[], Awaitable[T]]) -> T:
    """Run a Redis operation of a running job, retrying while Redis is away, however long.
    Giving the job up would not help anyone: while this worker lives, its heartbeat comes
    back with Redis and nobody may reclaim the job; the attempt's fence settles the rest."""
    delay = 0.05
    while True:
        try:
            return await op()
        except TRANSIENT as exc:
            log.warning("redis unavailable during a job, retrying: %s", exc)
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)


class LeaseLost(Exception):
    """This attempt no longer holds the job (it was taken over): stop, write nothing more."""


@dataclass
class ActiveJob:
    """The job an attempt runs, and the flags the event loop and the pipeline thread share."""

    job_id: str
    entry_id: str
    attempt: int
    takeover: bool
    message: JobMessage | None  # None: the queue's message could not be read (the job cannot run)
    translator: Translator
    deferrals: int = 0  # times the job was deferred so far (the blob store away while preparing it)
    began: float = field(default_factory=time.time)
    stop: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None  # why stop was set: cancel | lease_lost | shutdown | error | deadline
    progress_at: float = field(default_factory=time.monotonic)  # the pipeline's last event
    next_probe: float = 0.0  # monotonic time of the pipeline thread's next look at Redis

    def interrupt(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop.set()


class AttemptBlobs:
    """Writes an attempt's blobs (images, the trajectory) before the fenced script that names them
    (emit, finish, pause). Blobs are written outside the fences, so it first checks that the attempt
    still holds the job: False, writing nothing, when it does not. (One that loses the job in
    between writes under its own attempt's keys, which the fenced scripts then refuse to name.)"""

    def __init__(self, store: Store, blobs: BlobStore):
        self.store, self.blobs = store, blobs

    async def put(self, job: ActiveJob, items: list[tuple[str, bytes]]) -> bool:
        held, _cancel = await through_outage(lambda: self.store.lease(job.job_id, job.attempt))
        if not held:
            return False
        for key, body in items:  # the store retries a transient error itself; BlobError goes up
            await self.blobs.put(key, body)
        return True


class Publisher:
    """Publishes one attempt's events in order, off the pipeline's thread.

    The pipeline thread only queues (a bounded number of) events and goes on computing; this task
    sends whatever has queued up in one round trip (images and the trajectory so far first, then
    the fenced emits), so Redis latency is not added to every token and denoising step. A refused
    emit (the attempt lost the job) or a cancel flag in a reply interrupts the job, which the
    pipeline sees at its next should_cancel() check.
    """

    def __init__(
        self,
        store: Store,
        blobs: AttemptBlobs,
        metrics: WorkerMetrics,
        job: ActiveJob,
        loop: asyncio.AbstractEventLoop,
        max_pending: int = 2048,
    ):
        self.store, self.blobs, self.metrics = store, blobs, metrics
        self.job, self.loop = job, loop
        self.queue: asyncio.Queue[tuple[Wire, bytes | None] | None] = asyncio.Queue()
        self.slots = threading.Semaphore(max_pending)
        self.lost = False
        self.error: Exception | None = None  # a failure of the job's own (not Redis being away)
        self.seq = 0
        self.task = loop.create_task(self._run(), name=f"publish-{job.job_id}")

    def submit(self, wire: Wire, png: bytes | None) -> None:
        """From the pipeline thread. Raises LeaseLost once the attempt has lost the job."""
        if self.lost:
            raise LeaseLost(self.job.job_id)
        self.job.progress_at = time.monotonic()
        self.slots.acquire()
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (wire, png))

    async def close(self) -> None:
        """Flush everything queued; afterwards `lost` says whether all of it was accepted."""
        await self.queue.put(None)
        await self.task

    async def _run(self) -> None:
        done = False
        while not done:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < 512:
                batch.append(self.queue.get_nowait())
            done = batch[-1] is None
            items = [item for item in batch if item is not None]
            try:
                if items and not self.lost:
                    await self._send(items)
            except LeaseLost:
                self.lost = True
                self.job.interrupt("lease_lost")
            except Exception as exc:
                log.exception("publishing failed")
                self.error, self.lost = exc, True
                self.job.interrupt("error")
            finally:
                for _ in items:
                    self.slots.release()

    async def _send(self, items: list[tuple[Wire, bytes | None]]) -> None:
        job = self.job
        # The trajectory so far: the batch's latest record is enough (the emits below all name
        # the same blob, and go out together after it is written).
        trajectory = next((w for w, _png in reversed(items) if w.trajectory is not None), None)
        blobs = [
            (imagelib.storage_key(job.job_id, job.attempt, wire.image[0]), png)
            for wire, png in items
            if png is not None and wire.image is not None
        ]
        if trajectory is not None:
            blobs.append((trajectory.fields[TRAJECTORY_FIELD], trajectory.trajectory))
        if blobs and not await self.blobs.put(job, blobs):
            raise LeaseLost(job.job_id)
        emits = []
        for wire, _png in items:
            if wire.name or wire.fields:
                self.seq += 1
                emits.append((self.seq, wire.name, wire.data, wire.fields))
        if not emits:
            return
        results = await through_outage(lambda: self.store.emit_many(job.job_id, job.attempt, emits))
        for result in results:
            if not result.ok:
                raise LeaseLost(job.job_id)
            if result.cancel:
                job.interrupt("cancel")
        self.metrics.events.inc(len(emits))


class DeltaBuffer:
    """Coalesces a text stage's token pieces into fewer text.delta events: a delta goes out when
    it holds `max_pieces` pieces or `max_s` has passed since the last one went out (so a slow
    model's tokens go out one by one, at once), and before any other event. The text is carried
    whole, so the deltas still concatenate to exactly the stage's text."""

    def __init__(self, max_pieces: int, max_s: float):
        self.max_pieces, self.max_s = max_pieces, max_s
        self.held: list[TextDelta] = []
        self.last = time.monotonic()

    def add(self, event: TextDelta) -> TextDelta | None:
        if self.held and (self.held[0].iteration, self.held[0].stage) != (event.iteration, event.stage):
            out = self.flush()  # another stage's text (no event between): send the old, hold the new
            self.held = [event]
            return out
        self.held.append(event)
        if len(self.held) >= self.max_pieces or time.monotonic() - self.last >= self.max_s:
            return self.flush()
        return None

    def flush(self) -> TextDelta | None:
        if not self.held:
            return None
        first = self.held[0]
        merged = TextDelta(first.iteration, first.stage, "".join(e.delta for e in self.held))
        self.held = []
        self.last = time.monotonic()
        return merged
