"""`strokes migrate-keys` (service/queue/migrate.py): a deployment's keys in the layout before the
hash tag carry on under `{strokes}:` — the queue with its consumer group and pending entries, the
admission sets, the jobs and their events — and the store goes on with them. The old layout is
made from a live one by the same function run the other way."""

from __future__ import annotations

import redis

from strokes.service.cli.main import main
from strokes.service.queue import keys
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.migrate import migrate
from strokes.service.queue.store import Store
from strokes.service.shared.messages import JobMessage


async def _enqueue(store: Store, job_id: str, owner: str):
    return await store.enqueue(
        job_id, owner=owner, message=JobMessage(prompt="x"), body_hash="h", idempotency_key="k-" + job_id
    )


def _layout(client: redis.Redis) -> dict[str, bytes]:
    return {k.decode(): client.type(k) for k in client.scan_iter(count=1000)}


async def test_an_old_deployments_keys_carry_on_under_the_hash_tag(store: Store, capsys):
    store.settings.api_keys = ["key"]  # owners' quota sets too
    for job_id in ("running", "queued"):
        assert (await _enqueue(store, job_id, "o1")).outcome == "ok"
    await store.heartbeat("w1")
    entry_id, job_id = await store.poll("w1", 100)
    assert (await store.start(job_id, entry_id, "w1")).attempt == 1
    client = redis.Redis.from_url(store.settings.redis_url)
    try:
        now = _layout(client)
        old = migrate(client, keys.PREFIX, keys.LEGACY_PREFIX)  # the deployment as it was
        # names inside values: the queued set (1 member), the owner's set (2), each job's active_key (2)
        assert old.moved == len(now) and not old.conflicts and old.rewritten == 5
        assert not any(name.startswith(keys.PREFIX) for name in _layout(client))
        assert client.smembers("strokes:queued:jobs") == {b"strokes:job:queued"}

        await store.ensure_group()  # the new version started first: its empty queue is replaced
        assert main(["migrate-keys", "--redis-url", store.settings.redis_url, "--dry-run"]) == 0
        assert f"would move {len(now)} keys" in capsys.readouterr().out
        assert main(["migrate-keys", "--redis-url", store.settings.redis_url]) == 0
        assert _layout(client) == now
        assert main(["migrate-keys", "--redis-url", store.settings.redis_url]) == 0  # again: nothing
        assert "moved 0 keys" in capsys.readouterr().out
    finally:
        client.close()

    assert await store.queue_depth() == 1 and await store.r.smembers(keys.owner_active("o1")) == {
        keys.job("running").encode(),
        keys.job("queued").encode(),
    }
    assert await store.finish("running", 1, JobStatus.succeeded, "job.completed", {"job_id": "running"})
    entry_id, job_id = await store.poll("w1", 100)  # the queue's group and position carried on
    assert job_id == "queued" and (await store.start(job_id, entry_id, "w1")).attempt == 1
    assert await store.queue_depth() == 0
    assert [e.name for e in await store.read_events("running")] == [
        "job.queued",
        "job.started",
        "job.completed",
    ]


async def test_a_key_whose_new_name_is_taken_is_left_and_reported(store: Store, capsys):
    client = redis.Redis.from_url(store.settings.redis_url)
    try:
        client.set("strokes:stats", "old")
        client.hset(keys.STATS, "run_seconds_ewma", "3")
        assert main(["migrate-keys", "--redis-url", store.settings.redis_url]) == 1
        assert "not moved: strokes:stats" in capsys.readouterr().err
        assert client.get("strokes:stats") == b"old"
    finally:
        client.close()
