"""Steering's Redis side: the steer records of forks and paused jobs, and the fenced scripts that move
a job in and out of the `paused` status (the same discipline as store.py).

A steer record (keys.steer) says where a job's context comes from: {trajectory_key: the blob of the
stages to replay, point: {iteration, stage, text?, instruction?}, images: {image id: blob key},
lineage}. A fork gets one from the API before it is queued (service/api/forks.py); a paused job
from its worker, with the pause (service/worker/steering.py). The next attempt forks it.

    pause     running -> paused (fenced on the attempt), the steer record written, the queue entry
              acknowledged (no worker, no GPU holds it), job.paused, an entry in the expiry zset
    continue  paused -> queued with a new queue entry and job.resumed, through admission (the
              queue cap, the key's quota) in the same script; the caller's edited steer record
              is written by that script, so of two continues at once the one that wins decides
    end       paused -> canceled at once (a cancel, or a pause left unanswered past its time:
              error type pause_expired), one terminal event
    route     a resume's or fork's queue entry goes to the live, idle worker holding the job's warm
              context (XCLAIM), once

Every script is idempotent under retry. Knows nothing of tensors or HTTP.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis.asyncio as aioredis

from strokes.service.queue import keys
from strokes.service.queue.client import compact_json, decode
from strokes.service.queue.durability import DurableScript, replica_waits
from strokes.service.queue.scripts import load_script
from strokes.service.shared.settings import Settings

STEERING_SCRIPTS = ("pause", "continue", "end_paused", "route")  # service/queue/lua/{name}.lua


class Resume(str, Enum):
    """What the continue script did."""

    queued = "queued"  # continued: back in the queue
    not_paused = "not_paused"  # the job is not paused (detail: its status)
    stale = "stale"  # it paused again since the caller read it (detail: its attempt now)
    full = "full"  # the queue cap is reached (detail: the depth)
    quota = "quota"  # the key's quota of queued + running jobs is reached (detail: its count)


@dataclass(frozen=True)
class Resumed:
    outcome: Resume
    detail: str = ""


@dataclass(frozen=True)
class Pause:
    """A pause a worker writes: where the job stopped, its text, and the record a resume forks."""

    iteration: int
    stage: str
    text: str | None
    steer: dict[str, Any]  # the steer record naming the attempt's trajectory blob


class Steering:
    """The steer records and the steering scripts, on the client the store uses."""

    def __init__(self, client: aioredis.Redis, settings: Settings):
        self.r = client
        self.settings = settings
        # each run waits for the replicas (durability.py): a pause, a continue, an end survive a failover
        self.scripts = {
            name: DurableScript(
                client,
                client.register_script(load_script(name, settings.webhook_outbox_max)),
                replica_waits(settings),
                name,
            )
            for name in STEERING_SCRIPTS
        }

    @property
    def steer_ttl_s(self) -> int:
        return self.settings.result_ttl_s + self.settings.pause_timeout_s

    # -- steer records ------------------------------------------------------------------------------

    async def put_steer(self, job_id: str, steer: dict[str, Any]) -> None:
        await self.r.set(keys.steer(job_id), compact_json(steer), ex=self.steer_ttl_s)

    async def get_steer(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.r.get(keys.steer(job_id))
        return None if raw is None else json.loads(raw)

    async def drop_steer(self, job_id: str) -> None:
        await self.r.delete(keys.steer(job_id))

    # -- scripts ------------------------------------------------------------------------------------

    async def pause(self, job_id: str, attempt: int, pause: Pause) -> str:
        """running -> paused, once the attempt has written its trajectory so far (the blob its steer
        record names). Returns paused | cancel (a cancel was requested: end the job canceled) | fenced."""
        s = self.settings
        expires_at = time.time() + s.pause_timeout_s
        info = {
            "iteration": pause.iteration,
            "stage": pause.stage,
            "text": pause.text,
            "expires_at": round(expires_at, 3),
        }
        data = {
            "job_id": job_id,
            "attempt": attempt,
            **info,
            "waiting_for": "continue or cancel",
            "ts": round(time.time(), 6),
        }
        result = await self.scripts["pause"](
            keys=[
                keys.job(job_id),
                keys.events(job_id),
                keys.JOBS,
                keys.PAUSED,
                keys.QUEUED,
                keys.steer(job_id),
            ],
            args=[
                attempt,
                keys.GROUP,
                s.events_maxlen,
                int(expires_at * 1000),
                json.dumps(data),
                json.dumps(info),
                compact_json(pause.steer),
                self.steer_ttl_s,
                pause.steer["trajectory_key"],
            ],
        )
        return decode(result[0])

    async def resume(
        self, job_id: str, attempt: int, data: dict[str, Any], steer: dict[str, Any] | None = None
    ) -> Resumed:
        """paused -> queued with job.resumed carrying `data`, if the job is still in the pause of
        `attempt` and admission lets it in (queue cap, the key's quota); `steer` (the record with
        the caller's text) is written by the winning call only."""
        s = self.settings
        result = await self.scripts["continue"](
            keys=[
                keys.job(job_id),
                keys.events(job_id),
                keys.JOBS,
                keys.QUEUED,
                keys.PAUSED,
                keys.steer(job_id),
            ],
            args=[
                job_id,
                s.events_maxlen,
                json.dumps(data),
                s.queue_cap,
                s.key_max_jobs if s.api_keys else 0,  # as at enqueue: no keys, no quota
                compact_json(steer) if steer is not None else "",
                self.steer_ttl_s,
                attempt,
                uuid.uuid4().hex,  # this call's token: a retry of it is recognised
            ],
        )
        outcome = Resume(decode(result[0]))
        return Resumed(outcome, decode(result[1]) if len(result) > 1 else "")

    async def cancel_paused(self, job_id: str) -> bool:
        """Cancel a paused job at once; False when it is not paused (store.cancel handles it)."""
        data = {"job_id": job_id, "reason": "canceled while paused"}
        return await self._end(job_id, data, None, "") == "canceled"

    async def expire_pauses(self, limit: int = 20) -> list[str]:
        """End pauses left unanswered past their time (workers call this on their reclaim beat, the
        API every pause_sweep_interval_s: a pool scaled to zero still ends them). Any number of
        callers at once: end_paused ends a pause once. Returns the jobs this call ended (their
        inputs are the caller's to delete: the queue knows no blob store)."""
        now_ms = int(time.time() * 1000)
        due = await self.r.zrangebyscore(keys.PAUSED, "-inf", now_ms, start=0, num=limit)
        ended = []
        for raw in due:
            job_id = decode(raw)
            error = {
                "type": "pause_expired",
                "message": f"the pause was not answered within {self.settings.pause_timeout_s} s",
            }
            data = {"job_id": job_id, "reason": "pause_expired", "error": error}
            if await self._end(job_id, data, error, str(now_ms)) == "canceled":
                ended.append(job_id)
        return ended

    async def _end(self, job_id: str, data: dict, error: dict | None, before_ms: str) -> str:
        s = self.settings
        attempt = await self.r.hget(keys.job(job_id), "attempt")
        data = {**data, "attempt": int(attempt or 0), "ts": round(time.time(), 6)}
        result = await self.scripts["end_paused"](
            keys=[keys.job(job_id), keys.events(job_id), keys.PAUSED],
            args=[
                job_id,
                s.events_maxlen,
                s.events_ttl_s,
                s.result_ttl_s,
                json.dumps(data),
                json.dumps(error) if error else "",
                before_ms,
                uuid.uuid4().hex,  # this call's token: a retry of it is recognised
            ],
        )
        return decode(result[0])

    async def route(self, worker: str, entry_id: str, job_id: str) -> bool:
        """True when the entry went to the worker holding the job's warm context (not ours)."""
        result = await self.scripts["route"](
            keys=[keys.job(job_id), keys.JOBS],
            args=[worker, entry_id, keys.GROUP, keys.HEARTBEAT_PREFIX, job_id, keys.job("")],
        )
        return int(result) == 1

    async def name_warm_holder(self, job_id: str, worker: str) -> None:
        """Name this worker in the job hash as the holder of the job's caches (before a pause)."""
        await self.r.hset(keys.job(job_id), mapping={"warm_worker": worker})
