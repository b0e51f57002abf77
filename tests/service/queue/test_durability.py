"""Acknowledged means replicated (service/queue/durability.py): with `redis_min_replicas`, a job is
accepted, started, its events written and its end recorded only once a replica holds them, and a
reader (SSE, the webhook dispatcher) passes on only what a replica holds. A real master and replica
on loopback; the replica is stopped (SIGSTOP) to play a lagging one. Each test holds two clients of
the same Redis: a hasty one (a 200 ms replica timeout) for the calls a stopped replica must refuse,
and a patient one (10 s) for the calls that must succeed, so that a loaded machine, where a running
replica can take longer than 200 ms to answer, fails nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from testkit.asgi import SMALL, AppClient, error_of
from testkit.redis_ha import SentinelRedis

from strokes.service.queue import keys
from strokes.service.queue.client import connect
from strokes.service.queue.durability import NotDurable
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.results import Start
from strokes.service.queue.store import Store
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.settings import Settings

HASTY_MS = 200  # a stopped replica: the call is refused after this
PATIENT_MS = 10_000  # a running replica on a loaded machine answers well within this


def _settings(url: str, tmp_path, replica_timeout_ms: int, **extra: object) -> Settings:
    return Settings(
        **extra,
        redis_url=url,
        redis_min_replicas=1,
        redis_replica_timeout_ms=replica_timeout_ms,
        restart_grace_s=0,
        ready_requires_worker=False,
        blob_dir=tmp_path / "blobs",
    )


async def _store(topology: SentinelRedis, tmp_path, replica_timeout_ms: int) -> Store:
    settings = _settings(topology.master.url, tmp_path, replica_timeout_ms)
    store = Store(connect(settings.redis_url, timeout_s=15, connect_timeout_s=1), settings)
    await store.ensure_group()
    return store


@pytest.fixture
async def store(replicated_redis: SentinelRedis, tmp_path) -> AsyncIterator[Store]:
    store = await _store(replicated_redis, tmp_path, PATIENT_MS)
    yield store
    await store.close()


@pytest.fixture
async def hasty(replicated_redis: SentinelRedis, tmp_path) -> AsyncIterator[Store]:
    store = await _store(replicated_redis, tmp_path, HASTY_MS)
    yield store
    await store.close()


def _replica_has(topology: SentinelRedis, key: str, field: str) -> str | None:
    with topology.servers[1].client() as replica:
        value = replica.hget(key, field)
    return value.decode() if value is not None else None


async def _enqueue(store: Store, job_id: str):
    return await store.enqueue(
        job_id, owner="", message=JobMessage(prompt="x"), body_hash="h", idempotency_key=None
    )


async def test_a_job_is_accepted_started_and_ended_only_once_a_replica_holds_it(
    store: Store, hasty: Store, replicated_redis: SentinelRedis
):
    replica = replicated_redis.servers[1]
    assert (await _enqueue(store, "j1")).outcome == "ok"
    assert _replica_has(replicated_redis, keys.job("j1"), "status") == "queued"  # before the answer

    replica.pause()
    try:
        with pytest.raises(NotDurable, match="the job j2 reached 0 of 1 replicas"):
            await _enqueue(hasty, "j2")
        entry_id, job_id = await store.poll("w1", 100)
        with pytest.raises(NotDurable, match="the start of j1"):
            await hasty.start(job_id, entry_id, "w1", token="t1")
    finally:
        replica.resume()
    replicated_redis.wait_caught_up()
    started = await store.start(job_id, entry_id, "w1", token="t1")  # the same start, retried
    assert (started.outcome, started.attempt, started.takeover) == (Start.run, 1, False)
    assert _replica_has(replicated_redis, keys.job("j1"), "status") == "running"

    replica.pause()
    try:
        with pytest.raises(NotDurable, match="the events of j1"):
            await hasty.emit_many("j1", 1, [(1, "stage.started", {"stage": "plan"}, None)])
        with pytest.raises(NotDurable, match="the events of j1"):  # a reader does not pass it on
            await hasty.read_events("j1", "0")
    finally:
        replica.resume()
    replicated_redis.wait_caught_up()
    # the publisher sends the batch again: applied once
    assert [
        e.ok for e in await store.emit_many("j1", 1, [(1, "stage.started", {"stage": "plan"}, None)])
    ] == [True]
    replica.pause()
    try:
        with pytest.raises(NotDurable, match="the end of j1"):
            await hasty.finish("j1", 1, JobStatus.succeeded, "job.completed", {"job_id": "j1"})
    finally:
        replica.resume()
    replicated_redis.wait_caught_up()
    assert await store.finish("j1", 1, JobStatus.succeeded, "job.completed", {"job_id": "j1"})
    events = [e.name for e in await store.read_events("j1", "0")]
    assert events == ["job.queued", "job.started", "stage.started", "job.completed"]  # each once
    assert _replica_has(replicated_redis, keys.job("j1"), "status") == "succeeded"


async def test_a_202_means_a_replica_holds_the_job_and_a_retry_with_the_same_key_finds_it(
    replicated_redis: SentinelRedis, tmp_path
):
    replica = replicated_redis.servers[1]
    headers = {"Idempotency-Key": "order-17"}
    url = replicated_redis.master.url
    async with (
        AppClient(_settings(url, tmp_path, HASTY_MS)) as hasty,
        AppClient(_settings(url, tmp_path, PATIENT_MS)) as client,
    ):
        replica.pause()
        try:
            reply = await hasty.post("/v1/generations", json=SMALL, headers=headers)
        finally:
            replica.resume()
        replicated_redis.wait_caught_up()
        assert reply.status_code == 503 and error_of(reply)["type"] == "service_unavailable"
        assert reply.headers["retry-after"] == "1"
        again = await client.post("/v1/generations", json=SMALL, headers=headers)
        assert again.status_code == 202, again.text
        job_id = again.json()["id"]
        assert _replica_has(replicated_redis, keys.job(job_id), "status") == "queued"
        third = await client.post("/v1/generations", json=SMALL, headers=headers)
        assert third.json()["id"] == job_id  # one job, whatever the first answer was


async def test_the_webhook_dispatcher_delivers_only_what_a_replica_holds(
    replicated_redis: SentinelRedis, tmp_path
):
    import httpx

    from strokes.service.webhooks.dispatcher import Dispatcher
    from strokes.service.webhooks.metrics import WebhookMetrics

    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a 24-byte key, base64
    url = replicated_redis.master.url
    redis = connect(url, timeout_s=15, connect_timeout_s=1)
    http = httpx.AsyncClient()
    spawned: list[str] = []

    def dispatcher(name: str, replica_timeout_ms: int) -> Dispatcher:
        """A dispatcher of the one group, consumer `name`; it records what it would deliver."""
        settings = _settings(url, tmp_path, replica_timeout_ms, webhook_secret=secret)
        made = Dispatcher(settings, name, WebhookMetrics(), redis, http)
        made._spawn = lambda message, attempt: spawned.append(message.entry_id)  # no HTTP here
        return made

    hasty, patient = dispatcher("d1", HASTY_MS), dispatcher("d2", PATIENT_MS)
    replica = replicated_redis.servers[1]
    try:
        await hasty.ensure_group()
        fields = {
            "job_id": "j1",
            "event": "job.completed",
            "event_id": "1-0",
            "url": "https://h.example/",
            "data": "{}",
        }
        replica.pause()
        try:
            first = (await redis.xadd(keys.WEBHOOK_OUTBOX, fields)).decode()
            await hasty.read_new()
        finally:
            replica.resume()
        assert spawned == []  # read, not delivered: pending with d1, for a later retry
        pending = await redis.xpending_range(keys.WEBHOOK_OUTBOX, keys.WEBHOOK_GROUP, "-", "+", 10)
        assert [(p["message_id"].decode(), p["consumer"].decode()) for p in pending] == [(first, "d1")]
        replicated_redis.wait_caught_up()
        second = (await redis.xadd(keys.WEBHOOK_OUTBOX, fields)).decode()
        await patient.read_new()
        assert spawned == [second] and first != second
    finally:
        await http.aclose()
        await redis.aclose()
