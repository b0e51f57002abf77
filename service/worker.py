"""The GPU worker loop: takes jobs from the queue and runs them on the loaded pipeline
(`strokes worker` is in worker_cli.py, event publishing in publisher.py).

The loop is a chain of small named steps (arq's worker): reclaim (take over a job whose worker's
heartbeat expired), poll (own pending entries first, then a new one), start (the `start` script
fences a new attempt), run (the pipeline in a thread; every event is published under the attempt's
fence), finish (terminal state, hand-back or retry). A heartbeat task keeps the lease and checks
that the attempt still holds the job. The pipeline asks `should_cancel()` between tokens and
denoising steps; it turns true on cancel, on lease loss and on SIGTERM, which hands the job back
at once (within `handback_wait_s`, even mid-step) and exits 0. The worker reconnects to Redis by
itself and keeps its job through an outage of any length.

A job never kills the worker: an exception of its own ends it with job.failed and the real cause;
only a fatal device error (the job is handed back with its cause written) ends the process, with
exit status 3. A job gets a deadline and a progress lease (no event for `progress_timeout_s`: failed,
and the process exits, since a hung kernel cannot be interrupted).

torch and the model are imported only when the pipeline is built, so importing this module stays
light.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import gc
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry as SyncRetry

from model.generation.events import NO_IMAGE_MESSAGE, Done, Paused, StageCompleted, StageStarted, TextDelta
from model.generation.events import Event as PipelineEvent
from model.generation.params import GenerationParams, InvalidParams
from service import blobs as bloblib
from service import images as imagelib
from service import keys as keyspace
from service import logging as slog
from service.keys import JobStatus
from service.metrics import WorkerMetrics
from service.publisher import ActiveJob, DeltaBuffer, LeaseLost, Publisher
from service.schemas import params_from_record
from service.settings import Settings
from service.steering import steering
from service.store import Store
from service.wire import (
    JOB_CANCELED,
    JOB_COMPLETED,
    JOB_FAILED,
    Translator,
    encode_trajectory,
    trajectory_key,
)

log = logging.getLogger("strokes.worker")
T = TypeVar("T")
TRANSIENT = (RedisError, OSError, TimeoutError)
EXIT_FATAL = 3  # the process exit status after a fatal device error (a supervisor restarts it)


class Pipeline(Protocol):
    def run(self, params: GenerationParams, should_cancel: Callable[[], bool]) -> Iterator[PipelineEvent]: ...


PipelineFactory = Callable[[str, str, "str | None"], Pipeline]


class PermanentError(Exception):
    """The job cannot succeed on any attempt (bad parameters, its input image expired)."""


class FatalError(Exception):
    """The device or the process is broken (e.g. a CUDA error poisons the context): the job was
    handed back with its cause written, and the worker exits (its supervisor restarts it)."""


# Errors after which the CUDA context (or the process) cannot be trusted with another job.
_FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "NCCL error")


def is_fatal(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(marker in str(exc) for marker in _FATAL_MARKERS)


def error_of(exc: BaseException) -> dict[str, str]:
    """The job's error for an exception: its real cause, type and message."""
    return {"type": "generation_failed", "message": f"{type(exc).__name__}: {exc}"[:500]}


def release_accelerator_memory() -> None:
    # Collect the finished job's cycles, but keep the CUDA allocator's cached blocks: emptying it
    # after every job makes the next one pay cudaMalloc again (the caches are sized per job anyway).
    gc.collect()


class Worker:
    def __init__(
        self,
        store: Store,
        pipeline: Pipeline,
        settings: Settings,
        name: str,
        metrics: WorkerMetrics | None = None,
        images: bloblib.BlobStore | None = None,
        executor: concurrent.futures.ThreadPoolExecutor | None = None,
    ):
        self.store = store
        self.pipeline = pipeline
        self.settings = settings
        self.name = name
        self.metrics = metrics or WorkerMetrics()
        self.images = images or bloblib.open_store(settings)
        self.job: ActiveJob | None = None
        self.stopping = asyncio.Event()
        self._last_reclaim = 0.0
        # The one thread that runs torch: pass the executor the model was loaded on (see torch_thread).
        self._executor = executor or torch_thread()
        self._probe: redis.Redis | None = None  # sync client of the pipeline thread (cancel checks)
        self.exit_code = 0
        self._handback: asyncio.Task | None = None

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
            await asyncio.wait_for(self.store.drop_heartbeat(self.name), 1.0)
        except (*TRANSIENT, asyncio.TimeoutError) as exc:
            log.warning("could not hand the job back (it is reclaimed after the lease): %s", exc)
        logging.shutdown()
        os._exit(0)

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
            self._executor.shutdown(wait=False, cancel_futures=True)
            if self._probe is not None:
                self._probe.close()
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
            with slog.job_context(job.job_id, job.attempt):
                await self.run_and_finish(job)
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
        await steering(self.store).expire_pauses()  # pauses left unanswered end here
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
        if await steering(self.store).route(self.name, entry_id, job_id):
            return None  # a resume or fork whose context is warm on another worker: handed there
        return entry_id, job_id

    async def start(self, entry_id: str, job_id: str) -> ActiveJob | None:
        started = await self.store.start(job_id, entry_id, self.name)
        if started.outcome != "run":
            with slog.job_context(job_id, started.attempt or None):
                log.info("entry not run: %s", started.outcome, extra={"entry_id": entry_id})
            if started.outcome == "dead":
                self.metrics.jobs.labels("failed").inc()
            if started.outcome in ("dead", "canceled"):
                await self.images.job_ended(job_id)
            return None
        raw = await self.store.get_job(job_id)
        record = json.loads(raw["request"]) if raw else {}
        self.metrics.attempts.inc()
        if started.takeover:
            self.metrics.takeovers.inc()
        with slog.job_context(job_id, started.attempt):
            log.info(
                "job started",
                extra={
                    "takeover": started.takeover,
                    "worker": self.name,
                    **slog.prompt_for_log(record.get("prompt", ""), self.settings.log_prompts),
                },
            )
        return ActiveJob(
            job_id, entry_id, started.attempt, started.takeover, record, Translator(job_id, started.attempt)
        )

    async def run_and_finish(self, job: ActiveJob) -> None:
        """Run the job and record its outcome. No exception of the job's own (the pipeline, the
        translation of its events, encoding its images, building its result) leaves this method:
        it ends the job with job.failed carrying the cause. Only Redis being away (the loop
        retries; reclaim recovers the job) and a fatal device error (the job is handed back with
        its cause written, then the process exits) go further."""
        try:
            outcome, payload = await self.run_job(job)
            await self.finish(job, outcome, payload)
        except LeaseLost:
            self.metrics.jobs.labels("lost").inc()
        except TRANSIENT:
            raise
        except Exception as exc:
            log.exception("the job failed outside the pipeline")
            cause = error_of(exc)
            if is_fatal(exc):
                await self.finish(job, "retry", cause)
                raise FatalError(cause["message"]) from exc
            await self.finish(job, "failed", cause)

    async def run_job(self, job: ActiveJob) -> tuple[str, Any]:
        """Run the pipeline; returns (outcome, payload): succeeded (Done) | canceled | handback |
        lost | retry (error) | failed (error)."""
        try:
            params = await self._params(job)
            params, extra = await steering(self.store).prepare_run(
                job.job_id, job.record, params, self.images, self.pipeline
            )
        except (PermanentError, LookupError, InvalidParams) as exc:  # steering: a fork or resume
            return "failed", {"type": "invalid_job", "message": str(exc)}
        loop = asyncio.get_running_loop()
        publisher = Publisher(self, job, loop)

        def should_cancel() -> bool:
            return self._should_cancel(job)

        def produce() -> Done | None:
            events = self.pipeline.run(params, should_cancel, **extra)
            try:
                return consume(events)
            finally:
                close = getattr(events, "close", None)
                if close is not None:
                    close()  # unwinds the pipeline (its finally blocks free its buffers)

        deltas = DeltaBuffer(self.settings.delta_max_tokens, self.settings.delta_max_ms / 1000)

        def publish(event: PipelineEvent) -> None:
            wire = job.translator.translate(event)
            if wire is not None:
                png = imagelib.encode_png(wire.image[1]) if wire.image is not None else None
                publisher.submit(wire, png)  # PNG encoding stays on this thread

        def consume(events: Iterator[PipelineEvent]) -> Done | None:
            for event in events:
                if isinstance(event, TextDelta):
                    merged = deltas.add(event)
                    if merged is not None:
                        publish(merged)
                    continue
                held = deltas.flush()  # every other event goes out after the text before it
                if held is not None:
                    publish(held)
                if isinstance(event, StageStarted):
                    slog.set_stage(event.stage.value)
                publish(event)
                if isinstance(event, StageCompleted):
                    log.info(
                        "stage completed",
                        extra={
                            "seconds": round(event.seconds, 3),
                            "prefilled_tokens": event.prefilled_tokens,
                            "cached_tokens": event.cached_tokens,
                        },
                    )
                    self.metrics.observe_stage(
                        event.stage.value,
                        event.seconds,
                        steps=event.steps,
                        generated_tokens=event.generated_tokens,
                        prefilled_tokens=event.prefilled_tokens,
                        cached_tokens=event.cached_tokens,
                    )
                if isinstance(event, (Done, Paused)):
                    return event
            return None

        try:
            done = await loop.run_in_executor(self._executor, contextvars.copy_context().run, produce)
            error = None
        except Exception as exc:
            done, error = None, exc
        await publisher.close()  # every queued event is written (or refused) before the outcome
        if publisher.error is not None:
            return "retry", error_of(publisher.error)
        if publisher.lost or isinstance(error, LeaseLost):
            return "lost", None
        if error is not None:
            if job.reason is not None:  # we asked it to stop, and it stopped
                return self._interrupted(job)
            if isinstance(error, InvalidParams):  # the model's own limits (e.g. its largest side)
                return "failed", {"type": "invalid_request", "message": str(error)}
            log.error("pipeline failed", exc_info=error)
            if is_fatal(error):
                raise error
            return "retry", error_of(error)
        if done is None:
            if job.reason is not None:
                return self._interrupted(job)
            return "retry", {"type": "generation_failed", "message": "the pipeline ended without a result"}
        if isinstance(done, Paused):
            return "paused", done
        if done.final_image_id is None:  # the model chose to stop before drawing anything
            return "failed", {"type": "no_image", "message": NO_IMAGE_MESSAGE}
        return "succeeded", done

    def _should_cancel(self, job: ActiveJob) -> bool:
        """The pipeline's check between tokens and steps. Besides the flags set from the event
        loop, it reads the job's cancel flag and attempt itself, at most every cancel_poll_s: the
        loop may lag behind a busy pipeline thread, and a cancel must land within one step."""
        if job.stop.is_set():
            return True
        now = time.monotonic()
        if now < job.next_probe:
            return False
        job.next_probe = now + self.settings.cancel_poll_s
        try:
            if self._probe is None:
                self._probe = redis.Redis.from_url(
                    self.settings.redis_url,
                    socket_timeout=0.5,
                    socket_connect_timeout=0.5,
                    retry=SyncRetry(NoBackoff(), 0),
                )
            status, attempt, cancel = self._probe.hmget(
                keyspace.job(job.job_id), "status", "attempt", "cancel"
            )
        except TRANSIENT:
            job.next_probe = now + 1.0  # Redis is away: the event loop's retries deal with it
            return False
        if status != b"running" or attempt != str(job.attempt).encode():
            job.interrupt("lease_lost")
        elif cancel == b"1":
            job.interrupt("cancel")
        return job.stop.is_set()

    def _interrupted(self, job: ActiveJob) -> tuple[str, Any]:
        if job.reason == "deadline":
            message = f"the job ran longer than its deadline of {self.settings.job_deadline_s:g} s"
            return "failed", {"type": "deadline_exceeded", "message": message}
        outcome = {"cancel": "canceled", "shutdown": "handback", "lease_lost": "lost", "error": "lost"}
        return outcome[job.reason or "cancel"], None

    async def finish(self, job: ActiveJob, outcome: str, payload: Any) -> None:
        s = self.store
        if outcome == "succeeded":
            done: Done = payload
            data, fields = job.translator.completed(done, self._timings(job))
            fields = {**fields, **steering(s).warm_fields(job.job_id, self.name, self.pipeline)}
            ok = await self._put_trajectory(job, done.trajectory) and await self._through_outage(
                job,
                lambda: s.finish(
                    job.job_id, job.attempt, JobStatus.succeeded, JOB_COMPLETED, data, fields=fields
                ),
            )
            result = "succeeded" if ok else "lost"
        elif outcome == "canceled":
            ok = await self._through_outage(
                job,
                lambda: s.finish(
                    job.job_id,
                    job.attempt,
                    JobStatus.canceled,
                    JOB_CANCELED,
                    {"job_id": job.job_id, "attempt": job.attempt},
                ),
            )
            result = "canceled" if ok else "lost"
        elif outcome == "failed":
            ok = await self._through_outage(
                job,
                lambda: s.finish(
                    job.job_id,
                    job.attempt,
                    JobStatus.failed,
                    JOB_FAILED,
                    {"job_id": job.job_id, "attempt": job.attempt, "error": payload},
                    fields={"error": payload},
                ),
            )
            result = "failed" if ok else "lost"
        elif outcome == "paused":  # steering: the context is stored, the job released
            await steering(s).mark_warm(job.job_id, self.name, self.pipeline)
            state = "fenced"
            if await self._put_trajectory(job, payload.trajectory):
                state = await self._through_outage(
                    job, lambda: steering(s).pause(job.job_id, job.attempt, payload)
                )
            if state == "cancel":
                return await self.finish(job, "canceled", None)
            result = "paused" if state == "paused" else "lost"
        elif outcome in ("handback", "retry"):
            state = await self._through_outage(
                job, lambda: s.requeue(job.job_id, job.attempt, outcome, payload)
            )
            result = {
                "queued": "handed_back" if outcome == "handback" else "retried",
                "dead": "failed",
                "canceled": "canceled",
            }.get(state, "lost")
        else:
            result = "lost"
        if result in ("succeeded", "canceled", "failed"):
            await self.images.job_ended(job.job_id)
        self.metrics.jobs.labels(result).inc()
        log.info("job ended: %s", result, extra={"outcome": result})

    # -- helpers --------------------------------------------------------------------------------------

    async def _put_trajectory(self, job: ActiveJob, trajectory: dict[str, Any]) -> bool:
        """Write the attempt's trajectory blob, before the fenced script that names it (finish,
        pause). False, writing nothing, when the attempt no longer holds the job."""
        held, _cancel = await self._through_outage(job, lambda: self.store.lease(job.job_id, job.attempt))
        if not held:
            return False
        body = encode_trajectory(trajectory)
        key = trajectory_key(job.job_id, job.attempt)
        await self._through_outage(job, lambda: self.images.put(key, body))
        return True

    async def _params(self, job: ActiveJob) -> GenerationParams:
        image = None
        if job.record.get("input_image"):
            from service.jobs import INPUT_IMAGE_ID

            png = await self.images.get(imagelib.storage_key(job.job_id, 0, INPUT_IMAGE_ID))
            if png is None:
                raise PermanentError("the input image has expired")
            image = await asyncio.to_thread(imagelib.decode_png, png)
        try:
            return params_from_record(job.record, image, self.settings.max_side)
        except (InvalidParams, ValueError, KeyError, TypeError) as exc:
            raise PermanentError(f"invalid parameters: {exc}") from exc

    def _timings(self, job: ActiveJob) -> dict[str, float]:
        return {"attempt_run_s": round(time.time() - job.began, 4)}

    async def _through_outage(self, job: ActiveJob, op: Callable[[], Awaitable[T]]) -> T:
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
            data = {"job_id": job.job_id, "attempt": job.attempt, "error": error}
            await self.store.finish(
                job.job_id, job.attempt, JobStatus.failed, JOB_FAILED, data, fields={"error": error}
            )
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
