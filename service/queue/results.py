"""What the job store's operations return (service/queue/store.py)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Admission(str, Enum):
    """What the enqueue script did with a job."""

    ok = "ok"  # admitted and queued
    duplicate = "duplicate"  # an Idempotency-Key seen before, with the same body: that job
    conflict = "conflict"  # an Idempotency-Key seen before, with another body
    full = "full"  # the queue cap is reached
    quota = "quota"  # the API key's quota of queued + running jobs is reached


@dataclass(frozen=True)
class Enqueued:
    outcome: Admission
    job_id: str | None = None
    depth: int = 0
    position: int = 0


class Start(str, Enum):
    """What the start script did with a polled queue entry."""

    run = "run"  # a new attempt of the job: run it
    gone = "gone"  # the job hash has expired: nothing to run
    skip = "skip"  # the job is not in a state to run (running elsewhere, paused, ended)
    canceled = "canceled"  # a cancel was requested before it started: it ended canceled
    dead = "dead"  # out of attempts: it ended failed, in the dead letters


@dataclass(frozen=True)
class Started:
    outcome: Start
    attempt: int = 0
    takeover: bool = False


class Requeued(str, Enum):
    """What the requeue script did with an attempt it hands back or retries."""

    queued = "queued"  # back in the queue for the next attempt
    dead = "dead"  # out of attempts: failed, in the dead letters
    canceled = "canceled"  # a cancel was requested: it ended canceled
    fenced = "fenced"  # this attempt no longer holds the job


@dataclass(frozen=True)
class Emitted:
    ok: bool  # False: fenced (the attempt no longer holds the job)
    cancel: bool = False  # a cancel was requested


@dataclass(frozen=True)
class Event:
    id: str
    name: str
    data: str  # JSON text, passed through to the client untouched
    attempt: int


@dataclass(frozen=True)
class QueueStats:
    depth: int  # accepted, not started
    lag: int | None  # queue entries not yet delivered to any worker
    pending: int  # delivered and not acknowledged (running or handed back)
    workers: int  # workers with a live heartbeat
