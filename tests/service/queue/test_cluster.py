"""The job store on a three-node Redis Cluster (redis+cluster://, testkit.redis_ha): every script of
the store and of steering runs there (a script may only touch keys of one slot: the `{strokes}`
hash tag puts them all in one), every key the flow writes sits in that one slot on one node, and a
node that lost its scripts (a promoted replica has none) has them loaded again, pipelines included."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.crc import key_slot
from testkit.redis_ha import ClusterRedis

from strokes.model.spec.events import Paused, Stage
from strokes.service.queue import keys
from strokes.service.queue.client import connect, master_address, server_info
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.results import Requeued, Start
from strokes.service.queue.steering import Resume, Steering
from strokes.service.queue.store import Store
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.settings import Settings
from strokes.service.worker.steering import pause_of

SLOT = key_slot(b"strokes")


@pytest.fixture
async def store(cluster_redis: ClusterRedis, tmp_path) -> AsyncIterator[Store]:
    for server in cluster_redis.servers:
        with server.client() as node:
            node.flushall()
    settings = Settings(
        redis_url=cluster_redis.url, restart_grace_s=0, max_attempts=2, blob_dir=tmp_path / "blobs"
    )
    store = Store(connect(settings.redis_address, timeout_s=5, connect_timeout_s=1), settings)
    await store.ensure_group()
    yield store
    await store.close()


async def _enqueue(store: Store, job_id: str, key: str | None = None):
    return await store.enqueue(
        job_id, owner="k1", message=JobMessage(prompt="x"), body_hash="h", idempotency_key=key
    )


async def _take(store: Store, steering: Steering, worker: str) -> tuple[str, Start, int]:
    """Poll, route (no warm holder: stays here) and start, as the worker's loop does."""
    await store.heartbeat(worker)
    entry_id, job_id = await store.poll(worker, 100)
    assert not await steering.route(worker, entry_id, job_id)
    started = await store.start(job_id, entry_id, worker)
    return job_id, started.outcome, started.attempt


async def test_every_script_runs_on_a_cluster_and_every_key_lands_in_one_slot(
    store: Store, cluster_redis: ClusterRedis
):
    steering = Steering(store.r, store.settings)
    for job_id in ("done", "gone", "paused", "dead"):
        assert (await _enqueue(store, job_id, key=f"k-{job_id}")).outcome == "ok"
    assert (await _enqueue(store, "done-again", key="k-done")).job_id == "done"  # idempotency
    assert await store.cancel("gone") == ("canceled", None)
    assert await store.queue_position((await store.get_job("dead"))["entry_id"]) == 4

    assert await _take(store, steering, "w1") == ("done", Start.run, 1)
    assert (await store.emit_many("done", 1, [(1, "stage.started", {"stage": "plan"}, None)]))[0].ok
    assert await store.requeue("done", 1, "handback") == Requeued.queued
    assert (await store.reclaim("w2"))[1] == keys.HANDBACK_CONSUMER  # no worker's: taken at once
    assert await _take(store, steering, "w2") == ("done", Start.run, 2)
    assert await store.finish("done", 2, JobStatus.succeeded, "job.completed", {"job_id": "done"})

    assert await _take(store, steering, "w1") == ("gone", Start.skip, 0)  # canceled while queued
    assert await _take(store, steering, "w1") == ("paused", Start.run, 1)
    paused = Paused(1, Stage.plan, "a plan", {"seed": 1, "stages": [{"iteration": 1, "stage": "plan"}]})
    assert await steering.pause("paused", 1, await pause_of(steering, "paused", 1, paused)) == "paused"
    resumed = await steering.resume("paused", 1, {"job_id": "paused"})
    assert resumed.outcome == Resume.queued

    error = {"type": "generation_failed", "message": "boom"}
    assert await _take(store, steering, "w3") == ("dead", Start.run, 1)
    assert await store.requeue("dead", 1, "retry", error) == Requeued.queued
    assert (await store.reclaim("w3"))[1] == keys.HANDBACK_CONSUMER
    assert await _take(store, steering, "w3") == ("dead", Start.run, 2)
    assert await store.requeue("dead", 2, "retry", error) == Requeued.dead  # max_attempts 2
    assert [d["job_id"] for d in await store.dead_letters()] == ["dead"]

    assert await _take(store, steering, "w1") == ("paused", Start.run, 2)  # continued
    assert await steering.pause("paused", 2, await pause_of(steering, "paused", 2, paused)) == "paused"
    assert await steering.cancel_paused("paused")
    assert await steering.expire_pauses() == []

    await store.trim_queue()
    await store.publish_worker("w1", "cpu")
    assert set(await store.worker_devices(60)) == {"w1"}
    assert (await store.queue_stats()).workers == 3
    assert await store.retry_after() >= 1
    for job_id, status in (
        ("done", "succeeded"),
        ("gone", "canceled"),
        ("dead", "failed"),
        ("paused", "canceled"),
    ):
        assert (await store.get_job(job_id))["status"] == status

    # Every key of the flow sits in the `{strokes}` slot, on the node that serves it.
    owner = await master_address(store.r)
    for server in cluster_redis.servers:
        with server.client() as node:
            names = node.keys("*")
        if server.address == owner:
            assert names and {key_slot(n) for n in names} == {SLOT}, names
        else:
            assert names == [], (server.address, names)
    assert (await server_info(store.r, "replication"))["role"] == "master"


async def test_a_node_that_lost_its_scripts_gets_them_again_in_and_out_of_pipelines(
    store: Store, cluster_redis: ClusterRedis
):
    assert (await _enqueue(store, "j1")).outcome == "ok"
    assert await _take(store, Steering(store.r, store.settings), "w1") == ("j1", Start.run, 1)
    owner = await master_address(store.r)
    with next(s for s in cluster_redis.servers if s.address == owner).client() as node:
        node.script_flush()  # as a promoted replica: no script cached
    emitted = await store.emit_many("j1", 1, [(1, "stage.started", {"stage": "plan"}, None)])  # a pipeline
    assert emitted[0].ok
    assert await store.finish("j1", 1, JobStatus.succeeded, "job.completed", {"job_id": "j1"})  # one script
    names = [e.name for e in await store.read_events("j1")]
    assert names == ["job.queued", "job.started", "stage.started", "job.completed"]
