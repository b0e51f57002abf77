"""Every Redis key the service uses, and the job states.

One module so the data layout can be read in one place (arq's constants.py). All keys share the
prefix `{strokes}:`; point several deployments at one Redis with different database numbers.
Redis holds job state, events and references: image bytes and trajectories (the record of every
stage, with the generator's state at each) live in the blob store (service/blobs/store.py).

The braces are a Redis Cluster hash tag: only `strokes` is hashed, so every key is in one slot and
every Lua script's keys are on one node (a script may only touch the keys of one slot). Scripts get
the keys they name in KEYS, built here; the keys they find in data (an admission set's members, a
pending entry's owner's heartbeat, the job a heartbeat names) share the tag, so they are in that
slot too; so is the webhook outbox, which every script may write and which is filled into their
shared prelude when they are loaded (scripts.py). What that buys and what it does not:
deploy/README.md, "Redis Cluster".

| key                          | type   | what                                                        |
|------------------------------|--------|-------------------------------------------------------------|
| {strokes}:jobs               | stream | the queue: one entry `{job_id}` per job, consumer group GROUP |
| {strokes}:queued:jobs        | set    | job-hash keys of queued jobs (the admission count = SCARD)   |
| {strokes}:owner:{o}:active   | set    | job-hash keys of an API key's queued and running jobs (quota) |
| {strokes}:dead               | stream | dead letters: jobs that failed for good, with their error    |
| {strokes}:workers            | zset   | worker name -> last heartbeat (ms), for /readyz and metrics |
| {strokes}:worker_info        | hash   | worker name -> JSON {device, at}: what GET /v1/info reports  |
| {strokes}:stats              | hash   | run_seconds_ewma: mean job run time, for Retry-After         |
| {strokes}:job:{id}           | hash   | the job: status, attempt, owner, request, results, trajectory_key (a blob key) |
| {strokes}:events:{id}        | stream | the job's events; entry ids are the SSE ids                 |
| {strokes}:blobs:sweep        | string | lock: the API replica sweeping the blob store this interval |
| {strokes}:hb:{worker}        | string | a worker's lease: exists while the worker is alive (PX TTL) |
| {strokes}:idem:{owner}:{hash} | hash  | Idempotency-Key -> job id and body hash                      |
| {strokes}:owner:{owner}:jobs | zset   | the owner's job ids by creation time (ms), for GET /v1/generations |
| {strokes}:webhooks           | stream | webhook outbox: events to deliver, consumer group WEBHOOK_GROUP |
| {strokes}:webhooks:dead      | stream | webhook deliveries given up after `webhook_retry_for_s`      |
| {strokes}:webhooks:dropped   | string | events not queued for delivery because the outbox was full   |
| {strokes}:steer:{id}         | string | a fork's or paused job's context (service/api/forks.py): blob keys, fork point |
| {strokes}:paused             | zset   | paused job id -> when its pause expires (ms)                 |
| {strokes}:liveness           | hash   | replid, seen_at, since: the master's identity and the workers' last write, for reclaim's grace |

Before this layout the prefix was `strokes:` (no tag): `strokes migrate-keys` moves a deployment's
keys over (service/queue/migrate.py).
"""

from __future__ import annotations

import hashlib
from enum import Enum

PREFIX = "{strokes}:"  # the hash tag {strokes}: one Redis Cluster slot for every key
LEGACY_PREFIX = "strokes:"  # the prefix before the hash tag (migrate.py)

JOBS = PREFIX + "jobs"
GROUP = "workers"
# Admission is counted as sets of job-hash keys, not counters: adding or removing a member twice
# changes nothing (scripts are safe to retry), and a set can be checked against the job hashes.
QUEUED = PREFIX + "queued:jobs"
DEAD_LETTERS = PREFIX + "dead"
WORKERS = PREFIX + "workers"
WORKER_INFO = PREFIX + "worker_info"
STATS = PREFIX + "stats"
HEARTBEAT_PREFIX = PREFIX + "hb:"
WEBHOOK_OUTBOX = PREFIX + "webhooks"
WEBHOOK_GROUP = "dispatchers"
WEBHOOK_DEAD = PREFIX + "webhooks:dead"
WEBHOOK_DROPPED = PREFIX + "webhooks:dropped"  # a counter: the outbox was full (webhook_outbox_max)
BLOB_SWEEP_LOCK = PREFIX + "blobs:sweep"  # images and trajectories live in the blob store, never here
PAUSED = PREFIX + "paused"
LIVENESS = PREFIX + "liveness"  # the grace after a failover, restart or outage (lua/prelude.lua)

# A consumer name no worker ever uses and that never heartbeats: entries handed back (SIGTERM,
# retry after a failure) are moved to it, so every worker's reclaim step sees them at once and
# they keep their place at the head of the queue. A consumer, not a key: it kept its name.
HANDBACK_CONSUMER = "strokes:handback"


def job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events(job_id: str) -> str:
    return f"{PREFIX}events:{job_id}"


def steer(job_id: str) -> str:
    return f"{PREFIX}steer:{job_id}"


def owner_active(owner: str) -> str:
    return f"{PREFIX}owner:{owner or '-'}:active"


def heartbeat(worker: str) -> str:
    return HEARTBEAT_PREFIX + worker


def owner_jobs(owner: str) -> str:
    # The owner is "" (no API keys) or a hex digest of the key (shared/owners.py): safe in a key.
    return f"{PREFIX}owner:{owner}:jobs"


def idempotency(owner: str, key: str) -> str:
    # Hashed: the client's key is arbitrary text and must not shape our key space.
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"{PREFIX}idem:{owner or '-'}:{digest}"


class JobStatus(str, Enum):
    """Where a job is in its life. Only the Lua scripts (service/lua/*.lua) move a job between states."""

    # (That docstring is part of openapi.yaml, kept as it was when the scripts moved to service/queue/lua/.)

    queued = "queued"  # accepted, durable, waiting for a worker (or handed back by one)
    running = "running"  # a worker holds it under the attempt number in the job hash
    paused = "paused"  # stopped at a pause point, holding no worker (service/api/forks.py)
    succeeded = "succeeded"  # terminal: job.completed was emitted
    failed = "failed"  # terminal: job.failed was emitted, and the job is in the dead letters
    canceled = "canceled"  # terminal: job.canceled was emitted

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})
