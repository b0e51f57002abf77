"""What the job store's operations return (service/queue/store.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Enqueued:
    outcome: str  # ok | duplicate | conflict | full | quota
    job_id: str | None = None
    depth: int = 0
    position: int = 0


@dataclass(frozen=True)
class Started:
    outcome: str  # run | gone | skip | canceled | dead
    attempt: int = 0
    takeover: bool = False


@dataclass(frozen=True)
class Emitted:
    ok: bool
    event_id: str = ""
    cancel: bool = False


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
