"""How one attempt of a job ends, as types: what the runner's `run` step returns and its `finish`
step records (service/worker/runner.py).

    Succeeded    the pipeline's Done, with a final image       -> job.completed
    Failed       an error of the job's own (bad parameters, no image, the deadline, ...) -> job.failed
    Canceled     a cancel stopped it                            -> job.canceled
    Paused       it stopped at a pause point (steering)         -> job.paused, no worker holds it
    Retry        the pipeline raised: another attempt may do better -> job.queued (or failed for good)
    HandedBack   SIGTERM stopped it: any worker takes it over   -> job.queued
    Deferred     it could not be prepared now (the blob store is away): requeued without a
                 failure mark, at most storage_max_deferrals times -> job.queued
    Lost         this attempt no longer holds the job (taken over, fenced): nothing to record

A job's error on the wire is {type, message} (JobError); its types are ErrorType's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from strokes.model.spec.events import Done
from strokes.model.spec.events import Paused as PausedEvent


class ErrorType(str, Enum):
    """`error.type` of a job that failed (job.failed) or is retried (job.queued)."""

    generation_failed = "generation_failed"  # the pipeline (or the work around it) raised
    invalid_job = "invalid_job"  # its parameters, input image or fork context cannot run
    invalid_request = "invalid_request"  # the model's own limits (e.g. its largest side)
    no_image = "no_image"  # the model ended the generation without drawing
    deadline_exceeded = "deadline_exceeded"  # ran longer than job_deadline_s
    no_progress = "no_progress"  # no event for progress_timeout_s (a hung kernel)
    storage_unavailable = "storage_unavailable"  # the blob store refused (or stayed away): its cause
    invalid_input = "invalid_input"  # its input image (or a fork's image) is damaged in the store


@dataclass(frozen=True)
class JobError:
    type: ErrorType
    message: str

    def to_json(self) -> dict[str, str]:
        return {"type": self.type.value, "message": self.message}

    @classmethod
    def of(cls, exc: BaseException) -> JobError:
        """The job's error for an exception: its real cause, type and message."""
        return cls(ErrorType.generation_failed, f"{type(exc).__name__}: {exc}"[:500])


@dataclass(frozen=True)
class Succeeded:
    done: Done


@dataclass(frozen=True)
class Failed:
    error: JobError


@dataclass(frozen=True)
class Canceled:
    pass


@dataclass(frozen=True)
class Paused:
    paused: PausedEvent


@dataclass(frozen=True)
class Retry:
    error: JobError


@dataclass(frozen=True)
class HandedBack:
    pass


@dataclass(frozen=True)
class Deferred:
    error: JobError


@dataclass(frozen=True)
class Lost:
    pass


Outcome = Succeeded | Failed | Canceled | Paused | Retry | HandedBack | Deferred | Lost


class Ended(str, Enum):
    """How the attempt ended once recorded: the label of strokes_worker_jobs_total."""

    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    paused = "paused"
    retried = "retried"
    handed_back = "handed_back"
    deferred = "deferred"
    lost = "lost"

    @property
    def terminal(self) -> bool:
        """The job ended here for good (its input image can go)."""
        return self in (Ended.succeeded, Ended.failed, Ended.canceled)
