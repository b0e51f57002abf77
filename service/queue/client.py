"""What the job store (store.py) and steering (steering.py) stand on: the Redis client that fails
fast and reconnects by itself (connect), the Lua scripts of service/lua/ read once, reply
decoding, and the typed results the store's operations return.

Every script lives in service/lua/<name>.lua (with prelude.lua in front) and is idempotent under
retry: the client re-sends a command whose reply was lost, so running a script twice with the same
arguments must leave the same state as once (tests/service/test_service_scripts.py runs each
twice).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from strokes.service.queue import keys

# ---- the client ---------------------------------------------------------------------------------


def connect(
    url: str, *, timeout_s: float, connect_timeout_s: float, max_connections: int = 1000, retries: int = 1
) -> aioredis.Redis:
    """A client that fails fast: short socket timeouts, one quick retry, health checks.

    It reconnects by itself: each command takes a connection from the pool and opens a new one
    after a failure, so nothing has to be restarted when Redis comes back.
    """
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries),
        health_check_interval=15,
        max_connections=max_connections,
        decode_responses=False,
    )


# ---- Lua ----------------------------------------------------------------------------------------

LUA_DIR = Path(__file__).resolve().parent / "lua"
SCRIPT_NAMES = (
    "enqueue",
    "start",
    "emit",
    "finish",
    "requeue",
    "cancel",
    "reclaim",
    "trim",
    "position",
    "reconcile",
)


def load_script(name: str) -> str:
    """service/lua/{name}.lua with the shared prelude in front (the webhook outbox's key filled in)."""
    prelude = (LUA_DIR / "prelude.lua").read_text().replace("{{WEBHOOK_OUTBOX}}", keys.WEBHOOK_OUTBOX)
    return prelude + "\n" + (LUA_DIR / f"{name}.lua").read_text()


def load_scripts() -> dict[str, str]:
    """Every script of the store, read once."""
    return {name: load_script(name) for name in SCRIPT_NAMES}


SCRIPTS = load_scripts()


# ---- replies ------------------------------------------------------------------------------------


def decode(value: Any) -> str:
    """A reply's bytes (or number) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def field_args(fields: dict[str, Any] | None) -> list[str]:
    """Job-hash fields as a script's trailing arguments: name, value, ... (non-strings as JSON)."""
    out: list[str] = []
    for key, value in (fields or {}).items():
        out += [key, value if isinstance(value, str) else json.dumps(value)]
    return out


# ---- results ------------------------------------------------------------------------------------


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
