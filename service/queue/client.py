"""The Redis client every process uses: one that fails fast and reconnects by itself (connect), what
counts as Redis being away (TRANSIENT), and the helpers of replies and script arguments.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

# Redis is away (refused, reset, timed out): retry, reconnect, or answer 503; never a job's
# failure. The one definition every process uses. Not any OSError: redis-py turns its socket's
# errors into ConnectionError/TimeoutError, and an OSError from elsewhere (a damaged image, a full
# disk) is no Redis outage (the blob store's errors are not OSErrors at all: blobs/health.py).
TRANSIENT = (RedisError, ConnectionError, TimeoutError)

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


def compact_json(value: Any) -> str:
    """A value as JSON without spaces (what scripts and records store)."""
    return json.dumps(value, separators=(",", ":"))
