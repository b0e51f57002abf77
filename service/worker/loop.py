"""The GPU worker loop: takes jobs from the queue and hands each to its JobRunner (runner.py runs
a job on the loaded pipeline and ends it, publisher.py publishes its events; `strokes worker` is in
worker_cli.py).

The loop is a chain of small named steps (arq's worker): reclaim (take over a job whose worker's
heartbeat expired), poll (own pending entries first, then a new one), start (the `start` script
fences a new attempt), then the runner's run (the pipeline on the torch thread; every event is
published under the attempt's fence) and finish (terminal state, hand-back or retry). A heartbeat
task keeps the lease, checks that the attempt still holds the job and watches its deadline and
progress lease (no event for `progress_timeout_s`: failed, and the process exits, since a hung
kernel cannot be interrupted). SIGTERM stops the running job at its next step and hands it back
at once (within `handback_wait_s`, even mid-step); the worker then exits 0. The worker reconnects
to Redis by itself and keeps its job through an outage of any length.

A job never kills the worker; only a fatal device error (runner.FatalError: the job is handed
back with its cause written) ends the process, with exit status 3.

torch and the model are imported only when the pipeline is built, so importing this module stays
light.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from strokes.service.blobs.store import BlobStore
from strokes.service.queue.client import TRANSIENT
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.results import Requeued, Start
from strokes.service.queue.steering import Steering
from strokes.service.queue.store import Store
from strokes.service.shared import logs
from strokes.service.shared.messages import JobMessage, UnknownVersion
from strokes.service.shared.settings import Settings
from strokes.service.shared.wire import JOB_FAILED
from strokes.service.worker.metrics import WorkerMetrics
from strokes.service.worker.outcomes import Ended
from strokes.service.worker.publisher import ActiveJob
from strokes.service.worker.runner import FatalError, JobRunner
from strokes.service.worker.translate import Translator

log = logging.getLogger("strokes.worker")
EXIT_FATAL = 3  # the process exit status after a fatal device error (a supervisor restarts it)


def release_accelerator_memory() -> None:
    # Collect the finished job's cycles, but keep the CUDA allocator's cached blocks: emptying it
    # after every job makes the next one pay cudaMalloc again (the caches are sized per job anyway).
    gc.collect()


class Worker:
    """One worker process's loop: `run()` until `request_stop()` (SIGTERM), then `exit_code`."""

    def __init__(
        self,
        store: Store,
        steering: Steering,
        runner: JobRunner,
        blobs: BlobStore,
        settings: Settings,
        name: str,
        metrics: WorkerMetrics,
    ):
        self.store = store
        self.steering = steering
        self.runner = runner
        self.blobs = blobs
        self.settings = settings
        self.name = name
        self.metrics = metrics
        self.job: ActiveJob | None = None
        self.stopping = asyncio.Event()
        self._last_reclaim = 0.0
        self.exit_code = 0
        self._handback: asyncio.Task | None = None
        self._start_token = ("", "")  # (entry id, the token of its unanswered start)

    # -- lifecycle ----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: take no new job; hand the running one back at its next step, or, if
        that step is long (a VAE decode), within handback_wait_s from here (see _hand_back)."""
        if not self.stopping.is_set():
            log.info("stop requested", extra={"worker": self.name})
        self.stopping.set()
        if self.job is not None:
            self.job.interrupt("shutdown")
            if self._handback is None:
                self._handback = asyncio.get_running_loop().create_task(self._hand_back(self.job))

    async def _hand_back(self, job: ActiveJob) -> None:
        """The job did not stop within handback_wait_s of SIGTERM: hand it back from here, under
        its attempt's fence (whatever the pipeline thread still computes is refused), and exit
        the process at once: a thread in the middle of a kernel cannot be stopped otherwise."""
        await asyncio.sleep(self.settings.handback_wait_s)
        if self.job is not job:
            return  # it stopped by itself and was handed back in order
        try:
            state = await asyncio.wait_for(self.store.requeue(job.job_id, job.attempt, "handback"), 2.0)
            log.info("handed back mid-step: %s; exiting", state)
            if state in (Requeued.dead, Requeued.canceled):  # it ended here: its input goes
                await asyncio.wait_for(self.blobs.job_ended(job.job_id), 2.0)
            await asyncio.wait_for(self.store.drop_heartbeat(self.name), 1.0)
        except (*TRANSIENT, asyncio.TimeoutError) as exc:
            log.warning("could not hand the job back (it is reclaimed after the lease): %s", exc)
        logging.shutdown()
        os._exit(0)

    async def publish(self, device: str) -> None:
        """Say which device this worker runs on (GET /v1/info). Best effort: a worker runs fine
        without it."""
        try:
            await asyncio.wait_for(self.store.publish_worker(self.name, device), 2.0)
        except (*TRANSIENT, asyncio.TimeoutError) as exc:
            log.warning("could not publish the worker's device: %s", exc)

    async def run(self) -> None:
        await self._until_redis(self.store.ensure_group)
        await self._until_redis(lambda: self.store.heartbeat(self.name))
        beat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        log.info("worker ready", extra={"worker": self.name})
        backoff = 0.1
        try:
            while not self.stopping.is_set():
                try:
                    await self.step()
                    backoff = 0.1
                except TRANSIENT as exc:
                    log.warning("redis unavailable, retrying: %s", exc)
                    await self._sleep(backoff)
                    backoff = min(2.0, backoff * 2)
                except FatalError as exc:
                    log.critical("the device is broken, exiting: %s", exc)
                    self.exit_code = EXIT_FATAL
                    break
        finally:
            beat.cancel()
            try:
                await asyncio.wait_for(self.store.drop_heartbeat(self.name), 2)
            except (*TRANSIENT, asyncio.TimeoutError):
                pass
            self.runner.close()
            log.info("worker stopped", extra={"worker": self.name})

    async def step(self) -> bool:
        """One turn of the loop; True when a job ran."""
        await self.reclaim()
        polled = await self.poll()
        if polled is None:
            return False
        entry_id, job_id = polled
        if self.stopping.is_set():
            return False  # not started: it stays pending here and is reclaimed once we are gone
        job = await self.start(entry_id, job_id)
        if job is None:
            return False
        self.job = job
        if self.stopping.is_set():  # SIGTERM landed while the job was being started
            job.interrupt("shutdown")
        self.metrics.busy.set(1)
        try:
            with logs.job_context(job.job_id, job.attempt):
                await self.runner.run_and_finish(job)
        finally:
            self.job = None
            self.metrics.busy.set(0)
            release_accelerator_memory()
            self.metrics.observe_gpu()
        return True

    # -- steps ----------------------------------------------------------------------------------------

    async def reclaim(self) -> None:
        """Claim one entry whose owner's heartbeat has expired (dead worker, or handed back)."""
        now = time.monotonic()
        if now - self._last_reclaim < self.settings.reclaim_interval_s:
            return
        self._last_reclaim = now
        for job_id in await self.steering.expire_pauses():  # pauses left unanswered end here,
            await self.blobs.job_ended(job_id)  # and their inputs go with them
        claimed = await self.store.reclaim(self.name)
        if claimed:
            log.info("claimed a pending job", extra={"entry_id": claimed[0], "from_worker": claimed[1]})

    async def poll(self) -> tuple[str, str] | None:
        polled = await self.store.poll(self.name, self.settings.poll_block_ms)
        if polled is None:
            return None
        entry_id, job_id = polled
        if job_id is None:  # the entry was trimmed away: nothing to run
            await self.store.ack(entry_id)
            return None
        if await self.steering.route(self.name, entry_id, job_id):
            return None  # a resume or fork whose context is warm on another worker: handed there
        return entry_id, job_id

    async def start(self, entry_id: str, job_id: str) -> ActiveJob | None:
        # A start that failed (its reply, or its replicas' acknowledgement, was lost) is tried
        # again with its token when the entry comes back to us: answered as it was, not taken
        # for a takeover. Once answered, the entry's next delivery is a new start.
        if self._start_token[0] != entry_id:
            self._start_token = (entry_id, uuid.uuid4().hex)
        started = await self.store.start(job_id, entry_id, self.name, token=self._start_token[1])
        self._start_token = ("", "")
        if started.outcome != Start.run:
            with logs.job_context(job_id, started.attempt or None):
                log.info("entry not run: %s", started.outcome.value, extra={"entry_id": entry_id})
            if started.outcome == Start.dead:
                self.metrics.jobs.labels(Ended.failed.value).inc()
            if started.outcome in (Start.dead, Start.canceled):
                await self.blobs.job_ended(job_id)
            return None
        message, deferrals = await self._message(job_id)
        self.metrics.attempts.inc()
        if started.takeover:
            self.metrics.takeovers.inc()
        with logs.job_context(job_id, started.attempt):
            log.info(
                "job started",
                extra={
                    "takeover": started.takeover,
                    "worker": self.name,
                    **logs.prompt_for_log(message.prompt if message else "", self.settings.log_prompts),
                },
            )
        translator = Translator(job_id, started.attempt)
        return ActiveJob(
            job_id, entry_id, started.attempt, started.takeover, message, translator, deferrals=deferrals
        )

    async def _message(self, job_id: str) -> tuple[JobMessage | None, int]:
        """The job's message from the queue, or None when it cannot be read (a newer version, a
        damaged hash): the runner then fails the job, and the worker goes on. And how many times
        the job was deferred so far."""
        raw = await self.store.get_job(job_id)
        deferrals = int((raw or {}).get("deferrals") or 0)
        try:
            return (JobMessage.from_json(raw["request"]) if raw else None), deferrals
        except (ValueError, UnknownVersion) as exc:  # pydantic's ValidationError is a ValueError
            log.error("cannot read the job's message: %s", exc)
            return None, deferrals

    # -- liveness ---------------------------------------------------------------------------------------

    async def _until_redis(self, op: Callable[[], Awaitable[Any]]) -> None:
        delay = 0.1
        while not self.stopping.is_set():
            try:
                await op()
                return
            except TRANSIENT as exc:
                log.warning("waiting for redis: %s", exc)
                await self._sleep(delay)
                delay = min(2.0, delay * 2)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _heartbeat_loop(self) -> None:
        """Keep the lease alive, and notice cancel requests and lost leases between events."""
        last_trim = time.monotonic()
        while True:
            job = self.job
            try:
                await self.store.heartbeat(self.name, job.job_id if job else "")
                if job is not None:
                    held, cancel = await self.store.lease(job.job_id, job.attempt)
                    if not held:
                        job.interrupt("lease_lost")
                    elif cancel:
                        job.interrupt("cancel")
                    else:
                        await self._check_progress(job)
                if time.monotonic() - last_trim > 60:
                    last_trim = time.monotonic()
                    await self.store.trim_queue()
            except TRANSIENT as exc:
                log.warning("heartbeat failed: %s", exc)
                if job is not None:  # the pipeline waits on Redis, not on a hung kernel
                    job.progress_at = time.monotonic()
            except Exception:
                log.exception("heartbeat error")
            await asyncio.sleep(
                min(self.settings.heartbeat_interval_s, 0.5) if job else self.settings.heartbeat_interval_s
            )

    async def _check_progress(self, job: ActiveJob) -> None:
        """The job's deadline (stop at the next step, job.failed deadline_exceeded) and its
        progress lease: no event for progress_timeout_s means a hung kernel; the job is failed
        with that cause and the process exits (its supervisor starts a fresh one)."""
        s = self.settings
        if time.time() - job.began > s.job_deadline_s:
            job.interrupt("deadline")
        stalled = time.monotonic() - job.progress_at
        if stalled > s.progress_timeout_s and self.job is job:
            error = {
                "type": "no_progress",
                "message": f"the job made no progress for {stalled:.0f} s (limit {s.progress_timeout_s:g} s)",
            }
            log.critical("%s; failing it and exiting", error["message"])
            data = {"job_id": job.job_id, "attempt": job.attempt, "error": error, "ts": round(time.time(), 6)}
            await self.store.finish(
                job.job_id, job.attempt, JobStatus.failed, JOB_FAILED, data, fields={"error": error}
            )
            with contextlib.suppress(asyncio.TimeoutError):  # the job ended: its input goes (bounded)
                await asyncio.wait_for(self.blobs.job_ended(job.job_id), 5.0)
            await self.store.drop_heartbeat(self.name)
            logging.shutdown()
            os._exit(EXIT_FATAL)


# ---- the torch thread -----------------------------------------------------------------------------


def torch_thread() -> concurrent.futures.ThreadPoolExecutor:
    """A single thread for all torch work of the process: loading the model and running it.

    Each OS thread that runs torch CPU ops gets its own OpenMP team; two teams on the same cores
    fight (measured here: a tiny-model job took 0.11 s with loading and running on one thread and
    0.20 s when they ran on two). The event loop's thread never touches tensors.
    """
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pipeline")
