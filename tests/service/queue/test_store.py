"""The job store against a real redis-server: admission, idempotency, fencing, leases, cancel,
dead letters and trimming, each a property of one Lua script."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from strokes.service.api.errors import NotReady
from strokes.service.api.forks import trajectory_of
from strokes.service.blobs.local import LocalBlobs
from strokes.service.queue import keys
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.store import Store
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.wire import TRAJECTORY_FIELD, trajectory_key


async def _enqueue(store: Store, job_id: str, **kw):
    return await store.enqueue(
        job_id,
        owner=kw.pop("owner", ""),
        message=JobMessage(prompt="x"),
        body_hash=kw.pop("body_hash", "h"),
        idempotency_key=kw.pop("key", None),
    )


async def _take(store: Store, worker: str):
    await store.heartbeat(worker)
    entry_id, job_id = await store.poll(worker, 100)
    return job_id, entry_id, await store.start(job_id, entry_id, worker)


async def _events(store: Store, job_id: str) -> list[str]:
    return [e.name for e in await store.read_events(job_id)]


async def test_admission_never_accepts_beyond_the_cap_under_concurrency(store: Store):
    store.settings.queue_cap = 10
    results = await asyncio.gather(*[_enqueue(store, f"j{i}") for i in range(60)])
    assert sum(r.outcome == "ok" for r in results) == 10
    assert sum(r.outcome == "full" for r in results) == 50
    assert await store.queue_depth() == 10
    assert await store.r.xlen(keys.JOBS) == 10


async def test_started_jobs_free_their_place_in_the_queue(store: Store):
    store.settings.queue_cap = 1
    assert (await _enqueue(store, "a")).outcome == "ok"
    assert (await _enqueue(store, "b")).outcome == "full"
    await _take(store, "w1")
    assert (await _enqueue(store, "b")).outcome == "ok"


async def test_idempotency_key_gives_the_same_job_and_refuses_another_body(store: Store):
    first = await _enqueue(store, "j1", key="k-1")
    again = await asyncio.gather(*[_enqueue(store, f"x{i}", key="k-1") for i in range(10)])
    other = await _enqueue(store, "j2", key="k-1", body_hash="different")
    assert first.outcome == "ok"
    assert {(r.outcome, r.job_id) for r in again} == {("duplicate", "j1")}
    assert (other.outcome, other.job_id) == ("conflict", "j1")
    assert await store.r.xlen(keys.JOBS) == 1
    # keys are per owner: another caller's identical key is a new job
    assert (await _enqueue(store, "j3", key="k-1", owner="someone-else")).outcome == "ok"


async def test_a_stale_attempt_cannot_emit_or_finish_after_a_takeover(store: Store):
    await _enqueue(store, "j1")
    _, _, first = await _take(store, "w1")
    assert (first.outcome, first.attempt) == ("run", 1)
    assert (await store.emit("j1", 1, 1, "stage.started", {"n": 1})).ok
    await store.r.delete(keys.heartbeat("w1"))  # w1 stops heartbeating (kill -9)
    assert await store.reclaim("w2") is not None
    entry_id, _ = await store.poll("w2", 100)
    second = await store.start("j1", entry_id, "w2")
    assert (second.outcome, second.attempt, second.takeover) == ("run", 2, True)
    assert not (await store.emit("j1", 1, 2, "stage.started", {"n": 2})).ok
    assert not await store.finish("j1", 1, JobStatus.succeeded, "job.completed", {})
    assert await store.requeue("j1", 1, "handback") == "fenced"
    assert await store.finish("j1", 2, JobStatus.succeeded, "job.completed", {"ok": True})
    events = await store.read_events("j1")
    names = [e.name for e in events]
    assert names == ["job.queued", "job.started", "stage.started", "job.started", "job.completed"]
    assert [e.attempt for e in events] == [0, 1, 1, 2, 2]
    pending = await store.r.xpending(keys.JOBS, keys.GROUP)
    assert pending["pending"] == 0


async def test_a_stale_attempts_trajectory_blob_never_becomes_the_jobs_trajectory(store: Store):
    """Each attempt writes its own trajectory blob, then names it in a fenced write. After a
    takeover the old attempt (alive after all: a paused or partitioned process) may go on writing
    its blob, but the job no longer names it, and its fenced writes naming it are refused."""
    blobs = LocalBlobs(store.settings)
    await _enqueue(store, "j1")
    await _take(store, "w1")
    stale = trajectory_key("j1", 1)
    await blobs.put(stale, b'{"stages": ["attempt 1, stage 1"]}')
    assert (await store.emit("j1", 1, 1, "stage.completed", {}, {TRAJECTORY_FIELD: stale})).ok
    assert (await store.get_job("j1"))[TRAJECTORY_FIELD] == stale  # while attempt 1 holds the job
    await store.r.delete(keys.heartbeat("w1"))
    assert await store.reclaim("w2") is not None
    entry_id, _ = await store.poll("w2", 100)
    assert (await store.start("j1", entry_id, "w2")).takeover
    job = await store.get_job("j1")
    assert TRAJECTORY_FIELD not in job  # the takeover un-names the old attempt's blob
    with pytest.raises(NotReady):  # a fork waits for the new attempt's first stage
        await trajectory_of(job, blobs)
    # The stale attempt goes on: its blob write lands under its own key; naming it is refused.
    await blobs.put(stale, b'{"stages": ["attempt 1, stage 1", "attempt 1, stage 2"]}')
    assert not (await store.emit("j1", 1, 2, "stage.completed", {}, {TRAJECTORY_FIELD: stale})).ok
    fields = {TRAJECTORY_FIELD: stale}
    assert not await store.finish("j1", 1, JobStatus.succeeded, "job.completed", {}, fields=fields)
    assert TRAJECTORY_FIELD not in await store.get_job("j1")
    current = trajectory_key("j1", 2)
    await blobs.put(current, b'{"stages": ["attempt 2"]}')
    fields = {TRAJECTORY_FIELD: current}
    assert await store.finish("j1", 2, JobStatus.succeeded, "job.completed", {}, fields=fields)
    await blobs.put(stale, b'{"stages": ["attempt 1, late"]}')  # however late it writes
    job = await store.get_job("j1")
    assert job[TRAJECTORY_FIELD] == current
    assert await trajectory_of(job, blobs) == b'{"stages": ["attempt 2"]}'


async def test_a_retried_emit_is_applied_once_and_a_retried_finish_is_not_refused(store: Store):
    await _enqueue(store, "j1")
    await _take(store, "w1")
    batch = [(1, "stage.started", {"n": 1}, None), (2, "text.delta", {"n": 2}, {"stages": []})]
    assert all(e.ok for e in await store.emit_many("j1", 1, batch))
    assert all(e.ok for e in await store.emit_many("j1", 1, batch))  # the reply was lost: sent again
    assert await _events(store, "j1") == ["job.queued", "job.started", "stage.started", "text.delta"]
    assert await store.finish("j1", 1, JobStatus.succeeded, "job.completed", {})
    assert await store.finish("j1", 1, JobStatus.succeeded, "job.completed", {})
    assert (await _events(store, "j1")).count("job.completed") == 1


async def test_reclaim_leaves_jobs_of_live_workers_however_long_they_run(store: Store):
    await _enqueue(store, "j1")
    await _take(store, "w1")
    job = await store.get_job("j1")
    # The entry has been idle for an hour (XCLAIM ... IDLE sets that without waiting); the lease
    # (the heartbeat key) is what counts.
    await store.r.xclaim(keys.JOBS, keys.GROUP, "w1", 0, [job["entry_id"]], idle=3_600_000, justid=True)
    assert await store.reclaim("w2") is None
    await store.r.delete(keys.heartbeat("w1"))  # the lease ran out
    assert await store.reclaim("w2") == (job["entry_id"], "w1")


async def test_cancel_of_a_queued_job_ends_it_and_the_job_never_starts(store: Store):
    await _enqueue(store, "j1")
    assert await store.cancel("j1") == ("canceled", None)
    assert await store.cancel("j1") == ("canceled", None)  # idempotent, and so is its answer
    assert await store.queue_depth() == 0
    await store.heartbeat("w1")
    entry_id, job_id = await store.poll("w1", 100)
    assert (await store.start(job_id, entry_id, "w1")).outcome == "skip"
    assert await _events(store, "j1") == ["job.queued", "job.canceled"]
    assert (await store.r.xpending(keys.JOBS, keys.GROUP))["pending"] == 0


async def test_cancel_of_a_running_job_is_seen_by_its_next_emit(store: Store):
    await _enqueue(store, "j1")
    await _take(store, "w1")
    assert (await store.cancel("j1"))[0] == "canceling"
    emitted = await store.emit("j1", 1, 1, "image.progress", {"step": 1})
    assert emitted.ok and emitted.cancel
    assert await store.lease("j1", 1) == (True, True)


async def test_a_job_failing_on_every_attempt_goes_to_the_dead_letters(store: Store):
    store.settings.max_attempts = 3
    await _enqueue(store, "j1")
    outcomes = []
    for attempt in (1, 2, 3):
        await store.heartbeat("w1")
        await store.reclaim("w1")  # handed-back entries sit with the never-alive consumer
        entry_id, job_id = await store.poll("w1", 100)
        started = await store.start(job_id, entry_id, "w1")
        assert started.attempt == attempt
        outcomes.append(await store.requeue("j1", attempt, "retry", {"type": "boom", "message": "x"}))
    assert outcomes == ["queued", "queued", "dead"]
    job = await store.get_job("j1")
    assert job["status"] == "failed"
    assert json.loads(job["error"]) == {"type": "boom", "message": "x"}
    dead = await store.dead_letters()
    assert [d["job_id"] for d in dead] == ["j1"]
    assert (await _events(store, "j1")).count("job.failed") == 1


async def test_a_job_whose_workers_keep_dying_ends_failed_not_in_a_loop(store: Store):
    store.settings.max_attempts = 2
    await _enqueue(store, "j1")
    await _take(store, "w1")
    await store.r.delete(keys.heartbeat("w1"))
    await store.heartbeat("w2")
    await store.reclaim("w2")
    entry_id, _ = await store.poll("w2", 100)
    assert (await store.start("j1", entry_id, "w2")).outcome == "run"  # failures 1 < 2
    await store.r.delete(keys.heartbeat("w2"))
    await store.heartbeat("w3")
    await store.reclaim("w3")
    entry_id, _ = await store.poll("w3", 100)
    assert (await store.start("j1", entry_id, "w3")).outcome == "dead"
    assert (await store.get_job("j1"))["status"] == "failed"
    assert len(await store.dead_letters()) == 1


async def test_trim_keeps_every_pending_and_undelivered_entry(store: Store):
    for i in range(6):
        await _enqueue(store, f"j{i}")
    # j0, j1 done; j2 running; j3..j5 undelivered
    for _ in range(3):
        job_id, _, started = await _take(store, "w1")
        if job_id != "j2":
            await store.finish(job_id, started.attempt, JobStatus.succeeded, "job.completed", {})
    assert await store.trim_queue() == 2
    remaining = [f[b"job_id"].decode() for _, f in await store.r.xrange(keys.JOBS)]
    assert remaining == ["j2", "j3", "j4", "j5"]


async def test_waitaof_is_used_only_where_the_server_has_it(store: Store):
    info = await store.r.info("server")
    major, minor = (int(p) for p in info["redis_version"].split(".")[:2])
    assert await store.supports_waitaof() == ((major, minor) >= (7, 2))
    assert (await _enqueue(store, "j1")).outcome == "ok"  # either way the accept path works


async def test_workers_silent_for_three_leases_leave_the_workers_set(store: Store):
    stale_ms = (time.time() - 3 * store.settings.lease_ttl_s - 1) * 1000
    await store.r.zadd(keys.WORKERS, {"crashed": stale_ms})
    await store.heartbeat("alive")
    assert await store.r.zrange(keys.WORKERS, 0, -1) == [b"alive"]
    assert await store.count_live_workers() == 1


async def test_only_an_idle_worker_reclaims_and_a_restarted_redis_waits_for_the_heartbeats(store: Store):
    await _enqueue(store, "dead-job")
    await _enqueue(store, "busy-job")
    await _take(store, "dead")
    await _take(store, "busy")
    await store.r.delete(keys.heartbeat("dead"))  # its lease ran out
    assert await store.reclaim("busy") is None  # busy with its own job: it would sit behind it
    store.settings.restart_grace_s = 3600  # as if Redis had just restarted: no one may reclaim yet
    assert await store.reclaim("idle") is None
    store.settings.restart_grace_s = 0
    job = await store.get_job("dead-job")
    assert await store.reclaim("idle") == (job["entry_id"], "dead")


async def _liveness(store: Store) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (await store.r.hgetall(keys.LIVENESS)).items()}


async def test_a_new_master_or_a_silence_of_the_workers_starts_a_grace_before_any_reclaim(store: Store):
    """The grace is keyed on the master's identity and on the workers' writes, not only on uptime:
    a failover promotes a replica that has been up all along, and heartbeat keys also expire while
    writes are refused. Faked here by editing the liveness record; test_failover.py does it for real."""
    store.settings.restart_grace_s = 3600
    await _enqueue(store, "dead-job")
    await _enqueue(store, "handed-back")
    await _take(store, "dead")
    await _take(store, "busy")
    assert await store.requeue("handed-back", 1, "handback") == "queued"
    await store.r.delete(keys.heartbeat("dead"))
    # Within the grace the hand-back (no worker's) is taken at once; the dead worker's job is not.
    assert (await store.reclaim("idle"))[1] == keys.HANDBACK_CONSUMER
    await store.heartbeat("idle")  # alive, holding it now
    assert (await store.reclaim("idle-2")) is None

    store.settings.restart_grace_s = 1.0
    while (await store.r.info("server"))["uptime_in_seconds"] < 1:  # the session's Redis, just started
        await asyncio.sleep(0.05)
    settled = int((await _liveness(store))["seen_at"]) - 10_000  # as if the workers had beaten for 10 s
    await store.r.hset(keys.LIVENESS, mapping={"since": settled})
    assert (await store.reclaim("idle-2"))[1] == "dead"  # Redis up, same master, workers writing
    await store.heartbeat("idle-2")  # alive, holding that job now

    for i, change in enumerate(({"replid": "f" * 40}, {"seen_at": settled})):  # a failover; 10 s silent
        await _enqueue(store, f"job-{i}")
        await _take(store, f"dead-{i}")
        await store.r.delete(keys.heartbeat(f"dead-{i}"))
        await store.heartbeat(f"idle-{i}")
        await store.r.hset(keys.LIVENESS, mapping={"since": settled, **change})
        assert await store.reclaim(f"idle-{i}") is None, change
        record = await _liveness(store)
        assert int(record["since"]) == int(record["seen_at"]), change  # the grace starts now
        assert record["replid"] == (await store.r.info("replication"))["master_replid"]
        await store.r.hset(keys.LIVENESS, mapping={"since": settled})  # ... and once it is over
        assert (await store.reclaim(f"idle-{i}"))[1] == f"dead-{i}"
