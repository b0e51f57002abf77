"""Running one job and ending it: the `run` and `finish` steps of the worker loop (loop.py).

`run` prepares the job (its message's parameters, its input image, a fork's or resume's context),
runs the pipeline on the torch thread, translates each event (translate.py) and publishes it under
the attempt's fence (publisher.py), and returns the attempt's Outcome (outcomes.py). The pipeline
asks `should_cancel()` between tokens and denoising steps; it turns true on cancel, on lease loss,
at the deadline and on SIGTERM (the job's `interrupt`), and the job then stops within one step.
`finish` records the outcome with one fenced script: finish (succeeded, canceled, failed), the
pause (steering), or requeue (hand-back, retry); a trajectory is written to the blob store, under
the attempt's own key, just before the script that names it.

A job never kills the worker: an exception of its own ends it with job.failed and the real cause;
only Redis being away (the loop retries) and a fatal device error (FatalError: the job is handed
back with its cause written, and the worker exits) leave run_and_finish.

The blob store's errors are the job's, never the worker's (blobs/health.py): refused (a missing
bucket, a full disk) fails the job at once with `storage_unavailable` and its cause; unavailable
(the store's own retries spent) retries the job, or, while the job is being prepared (its input,
a fork's context), defers it without a failure mark after a growing wait. A damaged input image
fails it `invalid_input`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, Protocol

from strokes.model.spec.events import NO_IMAGE_MESSAGE, Done, StageCompleted, StageStarted, TextDelta
from strokes.model.spec.events import Event as PipelineEvent
from strokes.model.spec.events import Paused as PausedEvent
from strokes.model.spec.params import GenerationParams, InvalidParams, RunOptions
from strokes.service.blobs.health import BlobError, BlobRefused, BlobUnavailable
from strokes.service.blobs.store import BlobStore
from strokes.service.queue import keys
from strokes.service.queue.client import TRANSIENT, connect_sync
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.results import Requeued
from strokes.service.queue.steering import Steering
from strokes.service.queue.store import Store
from strokes.service.shared import images as imagelib
from strokes.service.shared import logs
from strokes.service.shared.settings import Settings
from strokes.service.shared.wire import (
    JOB_CANCELED,
    JOB_COMPLETED,
    JOB_FAILED,
    encode_trajectory,
    trajectory_key,
)
from strokes.service.worker import steering as worker_steering
from strokes.service.worker.metrics import WorkerMetrics
from strokes.service.worker.outcomes import (
    Canceled,
    Deferred,
    Ended,
    ErrorType,
    Failed,
    HandedBack,
    JobError,
    Lost,
    Outcome,
    Paused,
    Retry,
    Succeeded,
)
from strokes.service.worker.publisher import (
    ActiveJob,
    AttemptBlobs,
    DeltaBuffer,
    LeaseLost,
    Publisher,
    through_outage,
)

log = logging.getLogger("strokes.worker")


class Pipeline(Protocol):
    """What the worker runs: the model's pipeline (model/generation/pipeline.py) or a test's."""

    def run(
        self, params: GenerationParams, should_cancel: Callable[[], bool], options: RunOptions
    ) -> Generator[PipelineEvent, None, None]: ...

    def holds_warm(self, key: str) -> bool:
        """Whether the contexts of the run kept under `key` are still warm here."""
        ...


class FatalError(Exception):
    """The device or the process is broken (e.g. a CUDA error poisons the context): the job was
    handed back with its cause written, and the worker exits (its supervisor restarts it)."""


class CannotRun(Exception):
    """The job cannot run on any attempt (bad parameters, its input image or context expired)."""


DEFER_WAIT_MAX_S = 30.0  # the longest a worker waits before deferring a job it could not prepare


def storage_outcome(exc: BlobError, what: str) -> Failed | Retry:
    """A blob store failure while `what`: refused fails the job at once, unavailable retries it."""
    if isinstance(exc, BlobRefused):
        return Failed(JobError(ErrorType.storage_unavailable, f"the blob store refused {what}: {exc.cause}"))
    return Retry(
        JobError(ErrorType.storage_unavailable, f"the blob store was unavailable {what}: {exc.cause}")
    )


# Errors after which the CUDA context (or the process) cannot be trusted with another job.
_FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "NCCL error")


def _now() -> float:
    """An event's `ts`: when the worker produced it (every event carries one)."""
    return round(time.time(), 6)


def is_fatal(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(marker in str(exc) for marker in _FATAL_MARKERS)


class JobRunner:
    """Runs the worker's jobs, one at a time, on the pipeline and ends each (see the module
    docstring). Holds the torch thread and the pipeline thread's own Redis client."""

    def __init__(
        self,
        store: Store,
        steering: Steering,
        pipeline: Pipeline,
        settings: Settings,
        name: str,
        metrics: WorkerMetrics,
        blobs: BlobStore,
        executor: concurrent.futures.ThreadPoolExecutor,
    ):
        self.store = store
        self.steering = steering
        self.pipeline = pipeline
        self.settings = settings
        self.name = name
        self.metrics = metrics
        self.blobs = blobs
        self.attempt_blobs = AttemptBlobs(store, blobs)
        self.executor = executor  # the one thread that runs torch (loop.torch_thread)
        # the pipeline thread's blocking client (queue.client.connect_sync), for its cancel checks
        self._probe: Any = None

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
            await self.finish(job, await self.run(job))
        except LeaseLost:
            self.metrics.jobs.labels(Ended.lost.value).inc()
        except TRANSIENT:
            raise
        except BlobError as exc:  # writing the end's trajectory: the job's failure, not the worker's
            log.warning("the blob store failed at the job's end: %s", exc.cause)
            await self.finish(job, storage_outcome(exc, "the job's trajectory"))
        except Exception as exc:
            log.exception("the job failed outside the pipeline")
            cause = JobError.of(exc)
            if is_fatal(exc):
                await self.finish(job, Retry(cause))
                raise FatalError(cause.message) from exc
            await self.finish(job, Failed(cause))

    # -- run ----------------------------------------------------------------------------------------

    async def run(self, job: ActiveJob) -> Outcome:
        """Run the pipeline to the attempt's outcome."""
        if job.message is None:
            return Failed(JobError(ErrorType.invalid_job, "the job's message could not be read"))
        try:
            params = await self._params(job)
            params, options = await worker_steering.run_options(
                self.steering, self.blobs, job.job_id, job.message, params
            )
        except (CannotRun, worker_steering.ContextExpired, InvalidParams) as exc:
            return Failed(JobError(ErrorType.invalid_job, str(exc)))
        except imagelib.DamagedImage as exc:
            return Failed(JobError(ErrorType.invalid_input, f"the job's input cannot be read: {exc}"))
        except BlobRefused as exc:
            return storage_outcome(exc, "the job's input")
        except BlobUnavailable as exc:  # not the job's fault, nor the worker's: later, no failure
            message = f"the blob store was unavailable while the job was prepared: {exc.cause}"
            return Deferred(JobError(ErrorType.storage_unavailable, message))
        loop = asyncio.get_running_loop()
        publisher = Publisher(self.store, self.attempt_blobs, self.metrics, job, loop)

        def should_cancel() -> bool:
            return self._should_cancel(job)

        def produce() -> Done | PausedEvent | None:
            events = self.pipeline.run(params, should_cancel, options)
            try:
                return consume(events)
            finally:
                events.close()  # unwinds the generator (its finally blocks free the pipeline's buffers)

        deltas = DeltaBuffer(self.settings.delta_max_tokens, self.settings.delta_max_ms / 1000)

        def publish(event: PipelineEvent) -> None:
            wire = job.translator.translate(event)
            if wire is not None:
                png = imagelib.encode_png(wire.image[1]) if wire.image is not None else None
                publisher.submit(wire, png)  # PNG encoding stays on this thread

        def consume(events: Iterator[PipelineEvent]) -> Done | PausedEvent | None:
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
                    logs.set_stage(event.stage.value)
                publish(event)
                if isinstance(event, StageCompleted):
                    self._observe(event)
                if isinstance(event, (Done, PausedEvent)):
                    return event
            return None

        try:
            end = await loop.run_in_executor(self.executor, contextvars.copy_context().run, produce)
            error = None
        except Exception as exc:
            end, error = None, exc
        await publisher.close()  # every queued event is written (or refused) before the outcome
        if isinstance(publisher.error, BlobError):
            return storage_outcome(publisher.error, "the job's images")
        if publisher.error is not None:
            return Retry(JobError.of(publisher.error))
        if publisher.lost or isinstance(error, LeaseLost):
            return Lost()
        if error is not None:
            if job.reason is not None:  # we asked it to stop, and it stopped
                return self._interrupted(job)
            if isinstance(error, InvalidParams):  # the model's own limits (e.g. its largest side)
                return Failed(JobError(ErrorType.invalid_request, str(error)))
            log.error("pipeline failed", exc_info=error)
            if is_fatal(error):
                raise error
            return Retry(JobError.of(error))
        if end is None:
            if job.reason is not None:
                return self._interrupted(job)
            return Retry(JobError(ErrorType.generation_failed, "the pipeline ended without a result"))
        if isinstance(end, PausedEvent):
            return Paused(end)
        if end.final_image_id is None:  # the model chose to stop before drawing anything
            return Failed(JobError(ErrorType.no_image, NO_IMAGE_MESSAGE))
        return Succeeded(end)

    def _observe(self, event: StageCompleted) -> None:
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
                self._probe = connect_sync(self.settings.redis_address, timeout_s=0.5, connect_timeout_s=0.5)
            status, attempt, cancel = self._probe.hmget(keys.job(job.job_id), "status", "attempt", "cancel")
        except TRANSIENT:
            job.next_probe = now + 1.0  # Redis is away: the event loop's retries deal with it
            return False
        if status != b"running" or attempt != str(job.attempt).encode():
            job.interrupt("lease_lost")
        elif cancel == b"1":
            job.interrupt("cancel")
        return job.stop.is_set()

    def _interrupted(self, job: ActiveJob) -> Outcome:
        if job.reason == "deadline":
            message = f"the job ran longer than its deadline of {self.settings.job_deadline_s:g} s"
            return Failed(JobError(ErrorType.deadline_exceeded, message))
        if job.reason == "shutdown":
            return HandedBack()
        if job.reason in ("lease_lost", "error"):
            return Lost()
        return Canceled()

    async def _params(self, job: ActiveJob) -> GenerationParams:
        image = None
        if job.message.input_image:
            key = imagelib.storage_key(job.job_id, 0, imagelib.INPUT_IMAGE_ID)
            png = await self.blobs.get(key)  # BlobError: the caller's to judge
            if png is None:
                raise CannotRun("the input image has expired")
            image = await asyncio.to_thread(imagelib.decode_png, png)  # DamagedImage: invalid_input
        try:
            return job.message.to_params(image, self.settings.max_side)
        except (InvalidParams, ValueError) as exc:
            raise CannotRun(f"invalid parameters: {exc}") from exc

    # -- finish -------------------------------------------------------------------------------------

    async def finish(self, job: ActiveJob, outcome: Outcome) -> None:
        """Record the attempt's outcome (one fenced script), then count it and, when the job ended
        for good, delete its input."""
        match outcome:
            case Succeeded(done):
                ended = await self._succeed(job, done)
            case Failed(error):
                data = {"job_id": job.job_id, "attempt": job.attempt, "error": error.to_json(), "ts": _now()}
                fields = {"error": error.to_json()}
                ended = await self._end(job, JobStatus.failed, JOB_FAILED, data, fields)
            case Canceled():
                ended = await self._cancel(job)
            case Paused(paused):
                ended = await self._pause(job, paused)
            case Retry(error):
                ended = await self._requeue(job, "retry", error)
            case HandedBack():
                ended = await self._requeue(job, "handback", None)
            case Deferred(error):
                ended = await self._defer(job, error)
            case Lost():
                ended = Ended.lost
        if ended.terminal:
            await self.blobs.job_ended(job.job_id)
        self.metrics.jobs.labels(ended.value).inc()
        log.info("job ended: %s", ended.value, extra={"outcome": ended.value})

    async def _succeed(self, job: ActiveJob, done: Done) -> Ended:
        data, fields = job.translator.completed(done, {"attempt_run_s": round(time.time() - job.began, 4)})
        if self.pipeline.holds_warm(job.job_id):  # named with the end, before job.completed, so a
            fields = {**fields, "warm_worker": self.name}  # fork sent on that event is routed here
        if not await self._put_trajectory(job, done.trajectory):
            return Ended.lost
        return await self._end(job, JobStatus.succeeded, JOB_COMPLETED, data, fields)

    async def _cancel(self, job: ActiveJob) -> Ended:
        data = {"job_id": job.job_id, "attempt": job.attempt, "ts": _now()}
        return await self._end(job, JobStatus.canceled, JOB_CANCELED, data, None)

    async def _end(
        self, job: ActiveJob, status: JobStatus, event: str, data: dict, fields: dict | None
    ) -> Ended:
        finished = await through_outage(
            lambda: self.store.finish(job.job_id, job.attempt, status, event, data, fields=fields)
        )
        return Ended(status.value) if finished else Ended.lost

    async def _pause(self, job: ActiveJob, paused: PausedEvent) -> Ended:
        """The context is stored, the job released; a cancel that came first ends it canceled."""
        if self.pipeline.holds_warm(job.job_id):
            await through_outage(lambda: self.steering.name_warm_holder(job.job_id, self.name))
        if not await self._put_trajectory(job, paused.trajectory):
            return Ended.lost
        pause = await through_outage(
            lambda: worker_steering.pause_of(self.steering, job.job_id, job.attempt, paused)
        )
        state = await through_outage(lambda: self.steering.pause(job.job_id, job.attempt, pause))
        if state == "cancel":
            return await self._cancel(job)
        return Ended.paused if state == "paused" else Ended.lost

    async def _requeue(self, job: ActiveJob, reason: str, error: JobError | None) -> Ended:
        cause = error.to_json() if error is not None else None
        state = await through_outage(lambda: self.store.requeue(job.job_id, job.attempt, reason, cause))
        if state == Requeued.queued:
            return {"handback": Ended.handed_back, "defer": Ended.deferred}.get(reason, Ended.retried)
        return {Requeued.dead: Ended.failed, Requeued.canceled: Ended.canceled}.get(state, Ended.lost)

    async def _defer(self, job: ActiveJob, error: JobError) -> Ended:
        """Wait (1 s, doubling with each deferral of the job, at most DEFER_WAIT_MAX_S; SIGTERM or a
        cancel cuts it short), then requeue it without a failure mark: the store may be back by
        the time any worker takes it again."""
        log.warning("deferring the job: %s", error.message)
        wait_until = time.monotonic() + min(DEFER_WAIT_MAX_S, 2.0**job.deferrals)
        while time.monotonic() < wait_until and not job.stop.is_set():
            await asyncio.sleep(min(0.1, wait_until - time.monotonic()))
        if job.reason == "shutdown":
            return await self._requeue(job, "handback", None)
        return await self._requeue(job, "defer", error)

    async def _put_trajectory(self, job: ActiveJob, trajectory: dict) -> bool:
        """The attempt's whole trajectory, before the finish or pause that names it."""
        key = trajectory_key(job.job_id, job.attempt)
        return await self.attempt_blobs.put(job, [(key, encode_trajectory(trajectory))])
