"""The job store: every Redis operation of the service, the API's and the workers'.

Delivery is at-least-once (a Redis Streams consumer group); the client sees exactly one terminal
event because every state change is one Lua script that checks the job's state first, and every
write of a worker carries its attempt number as a fencing token: once a job is taken over, the
old attempt's events, completion and acknowledgement are all refused.

Each script is service/queue/lua/<name>.lua (scripts.py loads them; results.py has the result types) and
is idempotent under retry. Admission is counted as sets of job keys (keys.QUEUED,
keys.owner_active), reconciled against the job hashes whenever they look full, so no retry, crash
or restart makes the cap drift.

Life of a job (keys.py has the key layout):
    enqueue   admission (queue cap, the key's quota) + job hash + queue entry + job.queued, one
              script; then its waits on the same connection (durability.py: WAITAOF where the
              server has it, WAIT for `redis_min_replicas` replicas; start, emit, finish, requeue
              and cancel wait likewise)
    start     a worker got the entry: queued/running -> running, attempt += 1, job.started.
              A job that was `running` is a takeover (its worker died): that counts as a failure
    emit      append an event (and update the job hash) if the attempt still holds the job
    finish    terminal state + terminal event + XACK (+ dead letter when failed), fenced
    requeue   hand the job back (SIGTERM), retry it after an error (a failure) or defer it (the blob
              store was away while it was prepared: no failure): the entry moves to the
              never-alive HANDBACK consumer, so the next reclaim of any worker picks it up first
    cancel    queued: canceled at once; running: a flag the worker sees at its next event
    reclaim   move one pending entry whose owner has no heartbeat key to an idle caller. The lease
              is the heartbeat key's TTL, not the entry's idle time: a slow live worker is never
              robbed; nothing a worker held is reclaimed within a grace after a restart, a failover
              or an outage of the workers' writes (live workers write their heartbeats again first)
    heartbeat the lease key, the workers zset, and the liveness record the grace is keyed on
Payloads are JSON; nothing is pickled.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from strokes.service.queue import keys
from strokes.service.queue.client import Client, decode, field_args, server_info
from strokes.service.queue.durability import Waits, add_waits, check_waits, pipelined, run_script
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.results import (
    Admission,
    Emitted,
    Enqueued,
    Event,
    QueueStats,
    Requeued,
    Start,
    Started,
)
from strokes.service.queue.scripts import load_scripts
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.settings import Settings


class Store:
    """All Redis work of the API and the workers. `client` serves short commands; `blocking`
    (optional) serves XREAD/XREADGROUP BLOCK with a socket timeout longer than the block."""

    def __init__(self, client: Client, settings: Settings, blocking: Client | None = None):
        self.r = client
        self.blocking = blocking or client
        self.settings = settings
        sources = load_scripts(settings.webhook_outbox_max)
        self.scripts = {name: client.register_script(src) for name, src in sources.items()}
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
            server = await server_info(self.r, "server")
            persistence = await server_info(self.r, "persistence")
            version = tuple(int(p) for p in str(server.get("redis_version", "0")).split(".")[:2])
            self._waitaof = version >= (7, 2) and int(persistence.get("aof_enabled", 0)) == 1
        return self._waitaof

    async def waits(self, *, local: bool) -> Waits:
        """The waits after an acknowledged write (durability.py): WAITAOF where `local` and the
        server has it, WAIT for `redis_min_replicas` replicas."""
        s = self.settings
        aof = local and await self.supports_waitaof()
        return Waits(aof, s.redis_min_replicas, s.waitaof_timeout_ms, s.redis_replica_timeout_ms)

    async def _durably(
        self,
        name: str,
        script_keys: list[str],
        args: list,
        *,
        local: bool,
        what: str,
        wrote: Callable[[Any], bool] | None = None,
    ) -> Any:
        """Run script `name` followed by its waits (durability.run_script)."""
        waits = await self.waits(local=local)
        return await run_script(self.r, self.scripts[name], script_keys, args, waits, what, wrote)

    # -- API side -------------------------------------------------------------------------------

    async def enqueue(
        self,
        job_id: str,
        *,
        owner: str,
        message: JobMessage,
        body_hash: str,
        idempotency_key: str | None,
        fields: dict[str, Any] | None = None,
        events_maxlen: int | None = None,
    ) -> Enqueued:
        """Admit one job. `events_maxlen` bounds its event stream (budget.py; default the setting).
        Outcomes: ok | duplicate | conflict (Idempotency-Key) | full (queue cap) | quota (key)."""
        s = self.settings
        idem = keys.idempotency(owner, idempotency_key) if idempotency_key else keys.idempotency(owner, "")
        args = [
            job_id,
            s.queue_cap,
            message.to_json(),
            owner,
            body_hash,
            "1" if idempotency_key else "0",
            s.idempotency_ttl_s,
            events_maxlen or s.events_maxlen,
            s.key_max_jobs if s.api_keys else 0,  # without API keys there is no key to hold to it
            s.jobs_index_ttl_s,
            s.jobs_index_max,
            *field_args(fields),
        ]
        script_keys = [
            keys.job(job_id),
            keys.JOBS,
            keys.QUEUED,
            keys.events(job_id),
            idem,
            keys.owner_active(owner),
            keys.owner_jobs(owner),
        ]
        # The waits go on the same connection, outside any MULTI (WAITAOF does not block inside
        # one): the 202 is only sent once the job is on disk and on the replicas. A duplicate's
        # answer waits too: its job may be the one whose first answer was a 503.
        result = await self._durably(
            "enqueue",
            script_keys,
            args,
            local=True,
            what=f"the job {job_id}",
            wrote=lambda reply: decode(reply[0]) in (Admission.ok.value, Admission.duplicate.value),
        )
        outcome = Admission(decode(result[0]))
        if outcome == Admission.ok:
            return Enqueued(outcome, job_id, position=int(result[2]))
        if outcome in (Admission.full, Admission.quota):
            return Enqueued(outcome, depth=int(result[1]))
        return Enqueued(outcome, decode(result[1]))

    async def get_job(self, job_id: str) -> dict[str, str] | None:
        raw = await self.r.hgetall(keys.job(job_id))
        if not raw:
            return None
        return {decode(k): decode(v) for k, v in raw.items()}

    async def queue_position(self, entry_id: str) -> int:
        return int(await self.scripts["position"](keys=[keys.JOBS], args=[keys.GROUP, entry_id, 1000]))

    async def cancel(self, job_id: str) -> tuple[str, str | None]:
        s = self.settings
        result = await self._durably(
            "cancel",
            [keys.job(job_id), keys.events(job_id), keys.JOBS, keys.QUEUED, keys.DEAD_LETTERS],
            [keys.GROUP, s.events_maxlen, s.events_ttl_s, s.result_ttl_s],
            local=True,
            what=f"the cancel of {job_id}",
        )
        return decode(result[0]), (decode(result[1]) if len(result) > 1 else None)

    async def read_events(
        self, job_id: str, after: str = "0", *, count: int = 500, block_ms: int | None = None
    ) -> list[Event]:
        """Events with ids greater than `after`, oldest first; waits up to block_ms for the first.
        With `redis_min_replicas`, only events that many replicas hold (NotDurable otherwise)."""
        client = self.blocking if block_ms else self.r
        stream = {keys.events(job_id): after}
        waits = await self.waits(local=False)
        if not waits.count:
            reply = await client.xread(stream, count=count, block=block_ms)
        else:

            async def build(pipe) -> None:
                pipe.xread(stream, count=count, block=block_ms)
                await add_waits(pipe, client, waits)

            replies = await pipelined(client, build)
            reply = replies[0]
            if reply:
                check_waits(replies, waits, f"the events of {job_id}")
        out: list[Event] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                out.append(
                    Event(
                        decode(entry_id),
                        decode(fields[b"event"]),
                        decode(fields[b"data"]),
                        int(fields.get(b"attempt", b"0")),
                    )
                )
        return out

    async def stream_info(self, job_id: str) -> tuple[str, str, bool] | None:
        """(first kept event id, last event id, whether events were trimmed away) or None."""
        try:
            info = await self.r.xinfo_stream(keys.events(job_id))
        except ResponseError:  # no such stream
            return None
        first, last = info.get("first-entry"), info.get("last-generated-id")
        if not first or last is None:
            return None
        added = info.get("entries-added")
        trimmed = added is not None and int(added) > int(info["length"])
        return decode(first[0]), decode(last), trimmed

    async def count_live_workers(self) -> int:
        """Workers whose heartbeat is live."""
        horizon = time.time() * 1000 - self.settings.lease_ttl_s * 1000
        return int(await self.r.zcount(keys.WORKERS, horizon, "+inf"))

    async def queue_depth(self) -> int:
        return int(await self.r.scard(keys.QUEUED))

    async def queue_stats(self) -> QueueStats:
        depth = await self.queue_depth()
        lag, pending = None, 0
        try:
            for group in await self.r.xinfo_groups(keys.JOBS):
                if decode(group["name"]) == keys.GROUP:
                    lag = None if group.get("lag") is None else int(group["lag"])
                    pending = int(group.get("pending", 0))
        except ResponseError:  # no stream yet
            pass
        return QueueStats(depth, lag, pending, await self.count_live_workers())

    async def outbox_stats(self) -> tuple[int, int]:
        """(webhook messages waiting for delivery, events dropped because the outbox was full)."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.WEBHOOK_OUTBOX)
            pipe.get(keys.WEBHOOK_DROPPED)
            length, dropped = await pipe.execute()
        return int(length or 0), int(dropped or 0)

    async def retry_after(self) -> int:
        """Whole seconds until a full queue likely has room again: one job's mean run time spread
        over the live workers (the queue frees one place each time a worker starts a job)."""
        raw = await self.r.hget(keys.STATS, "run_seconds_ewma")
        mean = float(raw) if raw else self.settings.mean_job_seconds
        workers = max(1, await self.count_live_workers())
        return int(min(600, max(1, math.ceil(mean / workers))))

    # -- worker side ----------------------------------------------------------------------------

    async def heartbeat(self, worker: str, job_id: str = "") -> None:
        """Renew the lease; workers silent for 3 leases (dead ones) leave the workers set."""
        s = self.settings
        await self.scripts["heartbeat"](
            keys=[keys.heartbeat(worker), keys.WORKERS, keys.LIVENESS],
            args=[worker, job_id, int(s.lease_ttl_s * 1000), int(time.time() * 1000), self._gap_ms],
        )

    async def drop_heartbeat(self, worker: str) -> None:
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.delete(keys.heartbeat(worker))
            pipe.zrem(keys.WORKERS, worker)
            await pipe.execute()

    @property
    def _gap_ms(self) -> int:
        # No worker writing for two heartbeats: an outage of the workers' writes (lua/prelude.lua)
        return int(2 * self.settings.heartbeat_interval_s * 1000)

    async def reclaim(self, worker: str) -> tuple[str, str] | None:
        """Take one pending entry whose owner's lease expired (or one handed back); returns
        (entry_id, old_owner). Nothing a live-looking worker held is taken within the grace after
        a Redis restart, a failover or an outage of the workers' writes (reclaim.lua)."""
        s = self.settings
        grace = s.restart_grace_s if s.restart_grace_s is not None else s.lease_ttl_s + s.heartbeat_interval_s
        result = await self.scripts["reclaim"](
            keys=[keys.JOBS, keys.LIVENESS],
            args=[
                keys.GROUP,
                worker,
                keys.HEARTBEAT_PREFIX,
                int(grace * 1000),
                self._gap_ms,
                keys.HANDBACK_CONSUMER,
            ],
        )
        return (decode(result[0]), decode(result[1])) if result else None

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
                    return decode(entry_id), (decode(job_id) if job_id else None)
        return None

    async def ack(self, entry_id: str) -> None:
        await self.r.xack(keys.JOBS, keys.GROUP, entry_id)

    async def start(self, job_id: str, entry_id: str, worker: str, token: str | None = None) -> Started:
        """A new attempt of the job. `token` names this start: the same token again (a retry,
        after its reply or its replicas' acknowledgement was lost) answers as the first did."""
        s = self.settings
        result = await self._durably(
            "start",
            [keys.job(job_id), keys.JOBS, keys.QUEUED, keys.events(job_id), keys.DEAD_LETTERS],
            [
                entry_id,
                keys.GROUP,
                worker,
                s.max_attempts,
                s.events_maxlen,
                s.events_ttl_s,
                s.result_ttl_s,
                token or uuid.uuid4().hex,
            ],
            local=False,
            what=f"the start of {job_id}",
        )
        outcome = Start(decode(result[0]))
        attempt = int(result[1]) if len(result) > 1 and outcome != Start.skip else 0
        return Started(outcome, attempt, outcome == Start.run and decode(result[2]) == "1")

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
        waits = await self.waits(local=False)

        async def build(pipe) -> None:
            for seq, event, data, fields in items:
                payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
                await self.scripts["emit"](
                    keys=keys_, args=[attempt, seq, event, payload, maxlen, *field_args(fields)], client=pipe
                )
            await add_waits(pipe, self.r, waits)

        replies = await pipelined(self.r, build, [self.scripts["emit"]])
        # Short of the replicas: the caller sends the batch again (each emit's seq makes what
        # was applied a no-op, and re-applies, on a new master, what the failover lost).
        check_waits(replies, waits, f"the events of {job_id}")
        out = []
        for reply in replies[: len(items)]:
            if decode(reply[0]) != "ok":
                out.append(Emitted(False))
            else:
                out.append(Emitted(True, decode(reply[1]) == "1"))
        return out

    async def finish(
        self,
        job_id: str,
        attempt: int,
        status: JobStatus,
        event: str,
        data: dict[str, Any],
        *,
        fields: dict[str, Any] | None = None,
    ) -> bool:
        """The attempt's end, fenced. `fields` go on the job hash with it (a succeeded job's name
        the trajectory blob the worker wrote just before: wire.TRAJECTORY_FIELD)."""
        s = self.settings
        result = await self._durably(
            "finish",
            [keys.job(job_id), keys.events(job_id), keys.JOBS, keys.DEAD_LETTERS, keys.STATS, keys.QUEUED],
            [
                attempt,
                status.value,
                event,
                json.dumps(data, separators=(",", ":")),
                keys.GROUP,
                s.events_maxlen,
                s.events_ttl_s,
                s.result_ttl_s,
                *field_args(fields),
            ],
            local=True,
            what=f"the end of {job_id}",
        )
        return decode(result[0]) == "ok"

    async def requeue(
        self, job_id: str, attempt: int, reason: str, error: dict[str, str] | None = None
    ) -> Requeued:
        """Hand the job back ('handback'), retry it after an error ('retry', a failure) or defer it
        ('defer': it could not be prepared; no failure, storage_max_deferrals at most). Returns
        queued | dead (attempts or deferrals exhausted: failed + dead letter) | canceled | fenced."""
        s = self.settings
        result = await self._durably(
            "requeue",
            [keys.job(job_id), keys.events(job_id), keys.JOBS, keys.QUEUED, keys.DEAD_LETTERS],
            [
                attempt,
                reason,
                keys.GROUP,
                keys.HANDBACK_CONSUMER,
                s.max_attempts,
                json.dumps(error) if error else "",
                s.events_maxlen,
                s.events_ttl_s,
                s.result_ttl_s,
                s.storage_max_deferrals,
            ],
            local=True,
            what=f"the {reason} of {job_id}",
        )
        return Requeued(decode(result[0]))

    async def lease(self, job_id: str, attempt: int) -> tuple[bool, bool]:
        """(this attempt still holds the job, cancel requested)."""
        status, current, cancel = await self.r.hmget(keys.job(job_id), "status", "attempt", "cancel")
        held = status == b"running" and current is not None and int(current) == attempt
        return held, cancel == b"1"

    async def trim_queue(self) -> int:
        """Housekeeping of the workers: trim the queue stream, check the admission set."""
        await self.scripts["reconcile"](keys=[keys.QUEUED], args=[])
        try:
            return int(await self.scripts["trim"](keys=[keys.JOBS], args=[keys.GROUP]))
        except ResponseError:
            return 0

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        entries = await self.r.xrange(keys.DEAD_LETTERS, count=count)
        return [{decode(k): decode(v) for k, v in fields.items()} for _id, fields in entries]

    # -- worker info (what GET /v1/info reports) -----------------------------------------------------

    async def publish_worker(self, worker: str, device: str) -> None:
        """The worker's device, once its model is loaded (keys.WORKER_INFO)."""
        info = {"device": device, "at": time.time()}
        await self.r.hset(keys.WORKER_INFO, worker, json.dumps(info))

    async def worker_devices(self, stale_after_s: float) -> dict[str, str]:
        """{worker: device} of the workers whose heartbeat is live; entries of workers gone for
        `stale_after_s` (or unreadable) are deleted."""
        horizon = time.time() * 1000 - self.settings.lease_ttl_s * 1000
        live = {decode(n) for n in await self.r.zrangebyscore(keys.WORKERS, horizon, "+inf")}
        devices, stale = {}, []
        for raw_name, raw in (await self.r.hgetall(keys.WORKER_INFO)).items():
            name = decode(raw_name)
            try:
                info = json.loads(raw)
            except ValueError:
                stale.append(name)
                continue
            if name in live:
                devices[name] = str(info.get("device", "unknown"))
            elif time.time() - float(info.get("at", 0)) > stale_after_s:
                stale.append(name)
        if stale:
            await self.r.hdel(keys.WORKER_INFO, *stale)
        return devices
