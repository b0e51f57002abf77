"""Running one job and ending it: the `run` and `finish` steps of the worker loop (worker.py).

The pipeline runs on the torch thread; each event it yields is translated (wire.py) and published
under the attempt's fence (publisher.py). The pipeline asks `should_cancel()` between tokens and
denoising steps; it turns true on cancel, on lease loss, at the deadline and on SIGTERM (the job's
`interrupt`), and the job then stops within one step. Its outcome becomes one fenced script:
finish (succeeded, canceled, failed), steering's pause, or requeue (hand-back, retry); a
trajectory is written to the blob store, under the attempt's own key, just before the script that
names it.

A job never kills the worker: an exception of its own ends it with job.failed and the real cause;
only Redis being away (the loop retries) and a fatal device error (FatalError: the job is handed
back with its cause written, and the worker exits) leave run_and_finish.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry

from strokes.model.spec.events import NO_IMAGE_MESSAGE, Done, Paused, StageCompleted, StageStarted, TextDelta
from strokes.model.spec.events import Event as PipelineEvent
from strokes.model.spec.params import GenerationParams, InvalidParams
from strokes.service.blobs import store as bloblib
from strokes.service.queue import keys as keyspace
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.steering import steering
from strokes.service.queue.store import Store
from strokes.service.schemas import params_from_record
from strokes.service.shared import images as imagelib
from strokes.service.shared import logs as slog
from strokes.service.shared.metrics import WorkerMetrics
from strokes.service.shared.settings import Settings
from strokes.service.shared.wire import (
    JOB_CANCELED,
    JOB_COMPLETED,
    JOB_FAILED,
    encode_trajectory,
    trajectory_key,
)
from strokes.service.worker.publisher import (
    TRANSIENT,
    ActiveJob,
    DeltaBuffer,
    LeaseLost,
    Publisher,
    through_outage,
)

log = logging.getLogger("strokes.worker")


class Pipeline(Protocol):
    def run(self, params: GenerationParams, should_cancel: Callable[[], bool]) -> Iterator[PipelineEvent]: ...


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


class JobRunner:
    """Runs the worker's jobs, one at a time, on the pipeline and ends each (see the module
    docstring). Holds the torch thread and the pipeline thread's own Redis client."""

    def __init__(
        self,
        store: Store,
        pipeline: Pipeline,
        settings: Settings,
        name: str,
        metrics: WorkerMetrics,
        images: bloblib.BlobStore,
        executor: concurrent.futures.ThreadPoolExecutor,
    ):
        self.store = store
        self.pipeline = pipeline
        self.settings = settings
        self.name = name
        self.metrics = metrics
        self.images = images
        self.executor = executor  # the one thread that runs torch (worker.torch_thread)
        self._probe: redis.Redis | None = None  # sync client of the pipeline thread (cancel checks)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self._probe is not None:
            self._probe.close()

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
            done = await loop.run_in_executor(self.executor, contextvars.copy_context().run, produce)
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
            ok = await self._put_trajectory(job, done.trajectory) and await through_outage(
                lambda: s.finish(
                    job.job_id, job.attempt, JobStatus.succeeded, JOB_COMPLETED, data, fields=fields
                ),
            )
            result = "succeeded" if ok else "lost"
        elif outcome == "canceled":
            ok = await through_outage(
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
            ok = await through_outage(
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
                state = await through_outage(lambda: steering(s).pause(job.job_id, job.attempt, payload))
            if state == "cancel":
                return await self.finish(job, "canceled", None)
            result = "paused" if state == "paused" else "lost"
        elif outcome in ("handback", "retry"):
            state = await through_outage(lambda: s.requeue(job.job_id, job.attempt, outcome, payload))
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

    async def put_blobs(self, job: ActiveJob, blobs: list[tuple[str, bytes]]) -> bool:
        """Write (key, bytes) blobs of the attempt before the fenced script that names them (emit,
        finish, pause). Blobs are written outside the fences, so first check that the attempt
        still holds the job: False, writing nothing, when it does not. (One that loses the job in
        between writes under its own attempt's keys, which the fenced scripts then refuse to name.)"""
        held, _cancel = await through_outage(lambda: self.store.lease(job.job_id, job.attempt))
        if not held:
            return False
        for key, body in blobs:
            await through_outage(lambda k=key, b=body: self.images.put(k, b))
        return True

    async def _put_trajectory(self, job: ActiveJob, trajectory: dict[str, Any]) -> bool:
        """The attempt's whole trajectory, before the finish or pause that names it."""
        key = trajectory_key(job.job_id, job.attempt)
        return await self.put_blobs(job, [(key, encode_trajectory(trajectory))])

    async def _params(self, job: ActiveJob) -> GenerationParams:
        image = None
        if job.record.get("input_image"):
            from strokes.service.api.jobs import INPUT_IMAGE_ID

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
