"""The job store: every Redis operation of the service, and the Lua scripts that move jobs.

Delivery is at-least-once (a Redis Streams consumer group); the client sees exactly one terminal
event because every state change is one Lua script that checks the job's state first, and every
write of a worker carries its attempt number as a fencing token: once a job is taken over, the
old attempt's events, completion and acknowledgement are all refused.

Life of a job (keys.py has the key layout):
    enqueue   admission check (queue cap) + job hash + queue entry + job.queued, one script;
              then WAITAOF on the same connection where the server has it (Redis/Valkey >= 7.2)
    start     a worker got the entry: queued/running -> running, attempt += 1, job.started.
              A job that was `running` is a takeover (its worker died): that counts as a failure
    emit      append an event (and update the job hash) if the attempt still holds the job
    finish    terminal state + terminal event + XACK (+ dead letter when failed), fenced
    requeue   hand the job back (SIGTERM) or retry it after an error: the entry moves to the
              never-alive HANDBACK consumer, so the next reclaim of any worker picks it up first
    cancel    queued: canceled at once; running: a flag the worker sees at its next event
    reclaim   move one pending entry whose owner has no heartbeat key to the caller. The lease is
              the heartbeat key's TTL, not the entry's idle time: a slow live worker is never robbed
Payloads are JSON; nothing is pickled.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ResponseError

from service import keys
from service.keys import JobStatus
from service.settings import Settings

# ---- Lua ----------------------------------------------------------------------------------------

# >>> webhooks (issue 11): copy an event that the job subscribed to into the webhook outbox. The
# job hash has webhook_url and webhook_events (",name,name,", see service/webhooks.py); called
# right after every XADD of an event a webhook may want (finalize, start, emit).
_WEBHOOK = (
    r"""
local function webhook(jobkey, event, data, event_id)
  local w = redis.call('HMGET', jobkey, 'webhook_url', 'webhook_events', 'id')
  if w[1] and w[2] and string.find(w[2], ',' .. event .. ',', 1, true) then
    redis.call('XADD', '"""
    + keys.WEBHOOK_OUTBOX
    + r"""', '*', 'job_id', w[3], 'event', event, 'event_id', event_id, 'url', w[1], 'data', data)
  end
end
"""
)
# <<< webhooks

_PRELUDE = (
    _WEBHOOK
    + r"""
local function clock()
  local t = redis.call('TIME')
  return t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end

-- The one way a job ends: state, terminal event, expiry, acknowledgement, dead letter.
-- C = {job, events, jobs, dead, group, maxlen, events_ttl, result_ttl}
local function finalize(C, status, event, data, attempt, now)
  local j = redis.call('HMGET', C.job, 'entry_id', 'id')
  redis.call('HSET', C.job, 'status', status, 'finished_at', now, 'worker', '')
  local id = redis.call('XADD', C.events, 'MAXLEN', '~', C.maxlen, '*',
                        'event', event, 'attempt', tostring(attempt), 'data', data)
  webhook(C.job, event, data, id)  -- webhooks (issue 11)
  redis.call('EXPIRE', C.events, C.events_ttl)
  redis.call('EXPIRE', C.job, C.result_ttl)
  if j[1] then redis.call('XACK', C.jobs, C.group, j[1]) end
  if status == 'failed' then
    redis.call('XADD', C.dead, 'MAXLEN', '~', 100000, '*',
               'job_id', j[2], 'attempt', tostring(attempt), 'data', data, 'at', now)
  end
end
"""
)

# KEYS: job, jobs, queued, events, idem, owner_jobs
# ARGV: job_id, cap, request, owner, body_hash, has_idem, idem_ttl, maxlen, index_ttl, index_max,
#       [field, value]...
_ENQUEUE = (
    _PRELUDE
    + r"""
if ARGV[6] == '1' then
  local seen = redis.call('HMGET', KEYS[5], 'job_id', 'body_hash')
  if seen[1] then
    if seen[2] ~= ARGV[5] then return {'conflict', seen[1]} end
    return {'duplicate', seen[1]}
  end
end
local depth = tonumber(redis.call('GET', KEYS[3]) or '0')
if depth >= tonumber(ARGV[2]) then return {'full', tostring(depth)} end
local now = clock()
local entry = redis.call('XADD', KEYS[2], '*', 'job_id', ARGV[1])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'status', 'queued', 'attempt', '0', 'failures', '0',
           'cancel', '0', 'owner', ARGV[4], 'request', ARGV[3], 'body_hash', ARGV[5],
           'created_at', now, 'entry_id', entry)
for i = 11, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
-- The owner's job list (GET /v1/generations): newest kept, the key expires with the owner's
-- activity; ids whose job hash has expired are dropped by the reader.
redis.call('ZADD', KEYS[6], math.floor(tonumber(now) * 1000), ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[6], 0, -(tonumber(ARGV[10]) + 1))
redis.call('EXPIRE', KEYS[6], ARGV[9])
redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'event', 'job.queued', 'attempt', '0',
           'data', cjson.encode({job_id = ARGV[1], attempt = 0, position = depth + 1}))
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[5], 'job_id', ARGV[1], 'body_hash', ARGV[5])
  redis.call('EXPIRE', KEYS[5], ARGV[7])
end
return {'ok', entry, tostring(depth + 1)}
"""
)

# KEYS: job, jobs, queued, events, dead
# ARGV: entry_id, group, worker, max_attempts, maxlen, events_ttl, result_ttl
_START = (
    _PRELUDE
    + r"""
local C = {job = KEYS[1], jobs = KEYS[2], events = KEYS[4], dead = KEYS[5], group = ARGV[2],
           maxlen = ARGV[5], events_ttl = ARGV[6], result_ttl = ARGV[7]}
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
  return {'gone'}
end
local j = redis.call('HMGET', KEYS[1], 'status', 'entry_id', 'cancel', 'failures', 'id')
local status = j[1]
if j[2] ~= ARGV[1] or (status ~= 'queued' and status ~= 'running') then
  redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
  return {'skip', status or ''}
end
if status == 'queued' and tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then
  redis.call('DECR', KEYS[3])
end
local takeover = status == 'running'
local failures = tonumber(j[4] or '0')
if takeover then
  failures = failures + 1
  redis.call('HSET', KEYS[1], 'failures', failures)
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
local now = clock()
if j[3] == '1' then
  finalize(C, 'canceled', 'job.canceled', cjson.encode({job_id = j[5], attempt = attempt}), attempt, now)
  return {'canceled', tostring(attempt)}
end
if failures >= tonumber(ARGV[4]) then
  local err = {type = 'worker_lost', message = 'the job lost its worker on ' .. failures .. ' attempts'}
  redis.call('HSET', KEYS[1], 'error', cjson.encode(err))
  finalize(C, 'failed', 'job.failed', cjson.encode({job_id = j[5], attempt = attempt, error = err}),
           attempt, now)
  return {'dead', tostring(attempt)}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[3], 'attempt_started_at', now, 'seq', '0')
redis.call('HSETNX', KEYS[1], 'started_at', now)
local started = cjson.encode({job_id = j[5], attempt = attempt, worker = ARGV[3], takeover = takeover})
local started_id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'event', 'job.started',
                              'attempt', tostring(attempt), 'data', started)
webhook(KEYS[1], 'job.started', started, started_id)  -- webhooks (issue 11)
return {'run', tostring(attempt), takeover and '1' or '0'}
"""
)

# KEYS: job, events     ARGV: attempt, event ('' for none), data, maxlen, [field, value]...
# KEYS: job, events     ARGV: attempt, seq, event ('' for none), data, maxlen, [field, value]...
# `seq` numbers an attempt's emits from 1: a retried emit whose reply was lost is not applied twice.
_EMIT = (
    _WEBHOOK  # webhooks (issue 11)
    + r"""
local j = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'cancel', 'seq')
if j[1] ~= 'running' or j[2] ~= ARGV[1] then return {'fenced'} end
if tonumber(ARGV[2]) <= tonumber(j[4] or '0') then return {'ok', '', j[3] or '0'} end
redis.call('HSET', KEYS[1], 'seq', ARGV[2])
local id = ''
if ARGV[3] ~= '' then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
                  'event', ARGV[3], 'attempt', ARGV[1], 'data', ARGV[4])
  webhook(KEYS[1], ARGV[3], ARGV[4], id)  -- webhooks (issue 11)
end
if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
return {'ok', id, j[3] or '0'}
"""
)

# KEYS: job, events, jobs, dead, trajectory, stats
# ARGV: attempt, status, event, data, group, maxlen, events_ttl, result_ttl, trajectory, [field, value]...
_FINISH = (
    _PRELUDE
    + r"""
local C = {job = KEYS[1], events = KEYS[2], jobs = KEYS[3], dead = KEYS[4], group = ARGV[5],
           maxlen = ARGV[6], events_ttl = ARGV[7], result_ttl = ARGV[8]}
local j = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'attempt_started_at')
if j[1] == ARGV[2] and j[2] == ARGV[1] then return {'ok'} end  -- a retry whose reply was lost
if j[1] ~= 'running' or j[2] ~= ARGV[1] then return {'fenced'} end
if #ARGV > 9 then redis.call('HSET', KEYS[1], unpack(ARGV, 10)) end
if ARGV[9] ~= '' then redis.call('SET', KEYS[5], ARGV[9], 'EX', ARGV[8]) end
local now = clock()
if ARGV[2] == 'succeeded' and j[3] then
  local run = tonumber(now) - tonumber(j[3])
  local old = tonumber(redis.call('HGET', KEYS[6], 'run_seconds_ewma') or tostring(run))
  redis.call('HSET', KEYS[6], 'run_seconds_ewma', tostring(0.8 * old + 0.2 * run))
end
finalize(C, ARGV[2], ARGV[3], ARGV[4], ARGV[1], now)
return {'ok'}
"""
)

# KEYS: job, events, jobs, queued, dead
# ARGV: attempt, reason (handback|retry), group, handback consumer, max_attempts, error json or '',
#       maxlen, events_ttl, result_ttl
_REQUEUE = (
    _PRELUDE
    + r"""
local C = {job = KEYS[1], events = KEYS[2], jobs = KEYS[3], dead = KEYS[5], group = ARGV[3],
           maxlen = ARGV[7], events_ttl = ARGV[8], result_ttl = ARGV[9]}
local j = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'entry_id', 'cancel', 'id')
if j[1] == 'queued' and j[2] == ARGV[1] then return {'queued'} end  -- a retry whose reply was lost
if j[1] ~= 'running' or j[2] ~= ARGV[1] then return {'fenced'} end
local now = clock()
local attempt = tonumber(ARGV[1])
if j[4] == '1' then
  finalize(C, 'canceled', 'job.canceled', cjson.encode({job_id = j[5], attempt = attempt}), attempt, now)
  return {'canceled'}
end
local err = nil
if ARGV[6] ~= '' then err = cjson.decode(ARGV[6]) end
if ARGV[2] == 'retry' then
  local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
  if failures >= tonumber(ARGV[5]) then
    redis.call('HSET', KEYS[1], 'error', ARGV[6])
    finalize(C, 'failed', 'job.failed', cjson.encode({job_id = j[5], attempt = attempt, error = err}),
             attempt, now)
    return {'dead'}
  end
end
redis.call('XCLAIM', KEYS[3], ARGV[3], ARGV[4], 0, j[3], 'JUSTID')
redis.call('HSET', KEYS[1], 'status', 'queued', 'worker', '')
redis.call('INCR', KEYS[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'event', 'job.queued', 'attempt', ARGV[1],
           'data', cjson.encode({job_id = j[5], attempt = attempt, reason = ARGV[2], error = err}))
return {'queued'}
"""
)

# KEYS: job, events, jobs, queued, dead     ARGV: group, maxlen, events_ttl, result_ttl
_CANCEL = (
    _PRELUDE
    + r"""
local C = {job = KEYS[1], events = KEYS[2], jobs = KEYS[3], dead = KEYS[5], group = ARGV[1],
           maxlen = ARGV[2], events_ttl = ARGV[3], result_ttl = ARGV[4]}
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local j = redis.call('HMGET', KEYS[1], 'status', 'id', 'attempt')
if j[1] ~= 'queued' and j[1] ~= 'running' then return {'terminal', j[1]} end
redis.call('HSET', KEYS[1], 'cancel', '1')
if j[1] == 'queued' then
  if tonumber(redis.call('GET', KEYS[4]) or '0') > 0 then redis.call('DECR', KEYS[4]) end
  finalize(C, 'canceled', 'job.canceled', cjson.encode({job_id = j[2], attempt = tonumber(j[3])}),
           j[3], clock())
  return {'canceled'}
end
return {'canceling'}
"""
)

# KEYS: jobs     ARGV: group, worker, heartbeat prefix
_RECLAIM = r"""
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 100)
for _, p in ipairs(pending) do
  local id, owner = p[1], p[2]
  if owner ~= ARGV[2] and redis.call('EXISTS', ARGV[3] .. owner) == 0 then
    local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
    if #claimed > 0 then return {id, owner} end
  end
end
return {}
"""

# KEYS: jobs     ARGV: group
# Trim only what every reader is done with: ids below both the group's last-delivered id and its
# oldest pending entry (default XTRIM would also drop pending and undelivered jobs).
_TRIM = r"""
local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local floor = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  if name == ARGV[1] then floor = last end
end
if not floor then return 0 end
local summary = redis.call('XPENDING', KEYS[1], ARGV[1])
if tonumber(summary[1]) > 0 and older(summary[2], floor) then floor = summary[2] end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
"""

# KEYS: jobs     ARGV: group, entry_id, limit -> 1-based position of a queued entry
_POSITION = r"""
local last = '0-0'
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, ld
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then ld = g[i + 1] end
  end
  if name == ARGV[1] then last = ld end
end
local ahead = redis.call('XRANGE', KEYS[1], '(' .. last, ARGV[2], 'COUNT', ARGV[3])
return math.max(1, #ahead)
"""

SCRIPTS = {
    "enqueue": _ENQUEUE,
    "start": _START,
    "emit": _EMIT,
    "finish": _FINISH,
    "requeue": _REQUEUE,
    "cancel": _CANCEL,
    "reclaim": _RECLAIM,
    "trim": _TRIM,
    "position": _POSITION,
}


# ---- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Enqueued:
    outcome: str  # ok | duplicate | conflict | full
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


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(fields: dict[str, Any] | None) -> list[str]:
    out: list[str] = []
    for key, value in (fields or {}).items():
        out += [key, value if isinstance(value, str) else json.dumps(value)]
    return out


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


class Store:
    """All Redis work of the API and the workers. `client` serves short commands; `blocking`
    (optional) serves XREAD/XREADGROUP BLOCK with a socket timeout longer than the block."""

    def __init__(self, client: aioredis.Redis, settings: Settings, blocking: aioredis.Redis | None = None):
        self.r = client
        self.blocking = blocking or client
        self.settings = settings
        self.scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}
        self._waitaof: bool | None = None

    async def close(self) -> None:
        await self.r.aclose()
        if self.blocking is not self.r:
            await self.blocking.aclose()

    # -- setup and capabilities ---------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.r.xgroup_create(keys.JOBS, keys.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def supports_waitaof(self) -> bool:
        """WAITAOF exists from Redis/Valkey 7.2 and needs appendonly on; detected once."""
        if self._waitaof is None:
            server = await self.r.info("server")
            persistence = await self.r.info("persistence")
            version = tuple(int(p) for p in str(server.get("redis_version", "0")).split(".")[:2])
            self._waitaof = version >= (7, 2) and int(persistence.get("aof_enabled", 0)) == 1
        return self._waitaof

    # -- API side -------------------------------------------------------------------------------

    async def enqueue(
        self,
        job_id: str,
        *,
        owner: str,
        request: dict[str, Any],
        body_hash: str,
        idempotency_key: str | None,
        fields: dict[str, Any] | None = None,
    ) -> Enqueued:
        s = self.settings
        idem = keys.idempotency(owner, idempotency_key) if idempotency_key else keys.idempotency(owner, "")
        args = [
            job_id,
            s.queue_cap,
            json.dumps(request, separators=(",", ":")),
            owner,
            body_hash,
            "1" if idempotency_key else "0",
            s.idempotency_ttl_s,
            s.events_maxlen,
            s.jobs_index_ttl_s,
            s.jobs_index_max,
            *_pairs(fields),
        ]
        script_keys = [
            keys.job(job_id),
            keys.JOBS,
            keys.QUEUED,
            keys.events(job_id),
            idem,
            keys.owner_jobs(owner),
        ]
        if await self.supports_waitaof():
            # Same connection, no MULTI (WAITAOF does not block inside one): the 202 is only sent
            # once the job is fsynced to the AOF.
            async with self.r.pipeline(transaction=False) as pipe:
                await self.scripts["enqueue"](keys=script_keys, args=args, client=pipe)
                pipe.execute_command("WAITAOF", 1, 0, s.waitaof_timeout_ms)
                result, synced = await pipe.execute()
            if result[0] == b"ok" and int(synced[0]) < 1:
                raise TimeoutError("the job was not fsynced to the AOF in time")
        else:
            result = await self.scripts["enqueue"](keys=script_keys, args=args)
        outcome = _s(result[0])
        if outcome == "ok":
            return Enqueued("ok", job_id, position=int(result[2]))
        if outcome == "full":
            return Enqueued("full", depth=int(result[1]))
        return Enqueued(outcome, _s(result[1]))

    async def get_job(self, job_id: str) -> dict[str, str] | None:
        raw = await self.r.hgetall(keys.job(job_id))
        if not raw:
            return None
        return {_s(k): _s(v) for k, v in raw.items()}

    async def queue_position(self, entry_id: str) -> int:
        return int(await self.scripts["position"](keys=[keys.JOBS], args=[keys.GROUP, entry_id, 1000]))

    async def cancel(self, job_id: str) -> tuple[str, str | None]:
        s = self.settings
        result = await self.scripts["cancel"](
            keys=[keys.job(job_id), keys.events(job_id), keys.JOBS, keys.QUEUED, keys.DEAD_LETTERS],
            args=[keys.GROUP, s.events_maxlen, s.events_ttl_s, s.result_ttl_s],
        )
        return _s(result[0]), (_s(result[1]) if len(result) > 1 else None)

    async def read_events(
        self, job_id: str, after: str = "0", *, count: int = 500, block_ms: int | None = None
    ) -> list[Event]:
        """Events with ids greater than `after`, oldest first; waits up to block_ms for the first."""
        client = self.blocking if block_ms else self.r
        reply = await client.xread({keys.events(job_id): after}, count=count, block=block_ms)
        out: list[Event] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                out.append(
                    Event(
                        _s(entry_id),
                        _s(fields[b"event"]),
                        _s(fields[b"data"]),
                        int(fields.get(b"attempt", b"0")),
                    )
                )
        return out

    async def get_trajectory(self, job_id: str) -> str | None:
        raw = await self.r.get(keys.trajectory(job_id))
        return None if raw is None else _s(raw)

    async def live_workers(self) -> int:
        horizon = time.time() * 1000 - self.settings.lease_ttl_s * 1000
        return int(await self.r.zcount(keys.WORKERS, horizon, "+inf"))

    async def queue_stats(self) -> QueueStats:
        depth = int(await self.r.get(keys.QUEUED) or 0)
        lag, pending = None, 0
        try:
            for group in await self.r.xinfo_groups(keys.JOBS):
                if _s(group["name"]) == keys.GROUP:
                    lag = None if group.get("lag") is None else int(group["lag"])
                    pending = int(group.get("pending", 0))
        except ResponseError:  # no stream yet
            pass
        return QueueStats(depth, lag, pending, await self.live_workers())

    async def retry_after(self) -> int:
        """Whole seconds until a full queue likely has room again: one job's mean run time spread
        over the live workers (the queue frees one place each time a worker starts a job)."""
        raw = await self.r.hget(keys.STATS, "run_seconds_ewma")
        mean = float(raw) if raw else self.settings.mean_job_seconds
        workers = max(1, await self.live_workers())
        return int(min(600, max(1, math.ceil(mean / workers))))

    # -- worker side ----------------------------------------------------------------------------

    async def heartbeat(self, worker: str, job_id: str = "") -> None:
        ttl_ms = int(self.settings.lease_ttl_s * 1000)
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.set(keys.heartbeat(worker), job_id, px=ttl_ms)
            pipe.zadd(keys.WORKERS, {worker: time.time() * 1000})
            await pipe.execute()

    async def drop_heartbeat(self, worker: str) -> None:
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.delete(keys.heartbeat(worker))
            pipe.zrem(keys.WORKERS, worker)
            await pipe.execute()

    async def reclaim(self, worker: str) -> tuple[str, str] | None:
        """Take one pending entry whose owner's lease expired; returns (entry_id, old_owner)."""
        result = await self.scripts["reclaim"](
            keys=[keys.JOBS], args=[keys.GROUP, worker, keys.HEARTBEAT_PREFIX]
        )
        return (_s(result[0]), _s(result[1])) if result else None

    async def poll(self, worker: str, block_ms: int) -> tuple[str, str | None] | None:
        """The next entry for this worker: its own pending ones first (reclaimed, or left by an
        earlier life under the same name), then a new one. Returns (entry_id, job_id)."""
        for start_id, block in (("0", None), (">", block_ms)):
            client = self.blocking if block else self.r
            try:
                reply = await client.xreadgroup(
                    keys.GROUP, worker, {keys.JOBS: start_id}, count=1, block=block
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group()  # Redis lost the group (a restart without AOF)
                return None
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    job_id = fields.get(b"job_id") if fields else None
                    return _s(entry_id), (_s(job_id) if job_id else None)
        return None

    async def ack(self, entry_id: str) -> None:
        await self.r.xack(keys.JOBS, keys.GROUP, entry_id)

    async def start(self, job_id: str, entry_id: str, worker: str) -> Started:
        s = self.settings
        result = await self.scripts["start"](
            keys=[keys.job(job_id), keys.JOBS, keys.QUEUED, keys.events(job_id), keys.DEAD_LETTERS],
            args=[
                entry_id,
                keys.GROUP,
                worker,
                s.max_attempts,
                s.events_maxlen,
                s.events_ttl_s,
                s.result_ttl_s,
            ],
        )
        outcome = _s(result[0])
        attempt = int(result[1]) if len(result) > 1 and outcome != "skip" else 0
        return Started(outcome, attempt, outcome == "run" and _s(result[2]) == "1")

    async def emit(
        self,
        job_id: str,
        attempt: int,
        seq: int,
        event: str,
        data: dict[str, Any] | str,
        fields: dict[str, Any] | None = None,
    ) -> Emitted:
        return (await self.emit_many(job_id, attempt, [(seq, event, data, fields)]))[0]

    async def emit_many(
        self,
        job_id: str,
        attempt: int,
        items: list[tuple[int, str, dict[str, Any] | str, dict[str, Any] | None]],
    ) -> list[Emitted]:
        """Emit several events in order, in one round trip; each is fenced on its own. Items are
        (seq, event name or '', data, job-hash fields)."""
        keys_ = [keys.job(job_id), keys.events(job_id)]
        maxlen = self.settings.events_maxlen
        async with self.r.pipeline(transaction=False) as pipe:
            for seq, event, data, fields in items:
                payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
                await self.scripts["emit"](
                    keys=keys_, args=[attempt, seq, event, payload, maxlen, *_pairs(fields)], client=pipe
                )
            replies = await pipe.execute()
        out = []
        for reply in replies:
            if _s(reply[0]) != "ok":
                out.append(Emitted(False))
            else:
                out.append(Emitted(True, _s(reply[1]), _s(reply[2]) == "1"))
        return out

    async def finish(
        self,
        job_id: str,
        attempt: int,
        status: JobStatus,
        event: str,
        data: dict[str, Any],
        *,
        trajectory: str = "",
        fields: dict[str, Any] | None = None,
    ) -> bool:
        s = self.settings
        result = await self.scripts["finish"](
            keys=[
                keys.job(job_id),
                keys.events(job_id),
                keys.JOBS,
                keys.DEAD_LETTERS,
                keys.trajectory(job_id),
                keys.STATS,
            ],
            args=[
                attempt,
                status.value,
                event,
                json.dumps(data, separators=(",", ":")),
                keys.GROUP,
                s.events_maxlen,
                s.events_ttl_s,
                s.result_ttl_s,
                trajectory,
                *_pairs(fields),
            ],
        )
        return _s(result[0]) == "ok"

    async def requeue(
        self, job_id: str, attempt: int, reason: str, error: dict[str, str] | None = None
    ) -> str:
        """Hand the job back ('handback') or retry it after an error ('retry'). Returns
        queued | dead (attempts exhausted: failed + dead letter) | canceled | fenced."""
        s = self.settings
        result = await self.scripts["requeue"](
            keys=[keys.job(job_id), keys.events(job_id), keys.JOBS, keys.QUEUED, keys.DEAD_LETTERS],
            args=[
                attempt,
                reason,
                keys.GROUP,
                keys.HANDBACK_CONSUMER,
                s.max_attempts,
                json.dumps(error) if error else "",
                s.events_maxlen,
                s.events_ttl_s,
                s.result_ttl_s,
            ],
        )
        return _s(result[0])

    async def lease(self, job_id: str, attempt: int) -> tuple[bool, bool]:
        """(this attempt still holds the job, cancel requested)."""
        status, current, cancel = await self.r.hmget(keys.job(job_id), "status", "attempt", "cancel")
        held = status == b"running" and current is not None and int(current) == attempt
        return held, cancel == b"1"

    async def trim_queue(self) -> int:
        try:
            return int(await self.scripts["trim"](keys=[keys.JOBS], args=[keys.GROUP]))
        except ResponseError:
            return 0

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        entries = await self.r.xrange(keys.DEAD_LETTERS, count=count)
        return [{_s(k): _s(v) for k, v in fields.items()} for _id, fields in entries]
