"""Every Lua script of the store is idempotent under retry: redis-py re-sends a command whose reply
was lost, so each script runs here twice with the same arguments, and the whole database after
the second run must equal the database after the first (entries, counters, events, attempts), and
the second reply must equal the first (a retried call must not be told "409", "fenced" or "not
routed" about its own success).

`Twice` wraps the store's scripts (and steering's): every call made runs the script, snapshots
Redis, runs it again with the very same keys and arguments, and compares. The scenarios walk each
script through its outcomes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import SecretStr

from strokes.model.spec.events import Paused, Stage
from strokes.service.queue import keys
from strokes.service.queue.keys import JobStatus
from strokes.service.queue.steering import Resume, Steering
from strokes.service.queue.store import Store
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.wire import TRAJECTORY_FIELD, trajectory_key
from strokes.service.worker.steering import pause_of


async def snapshot(r) -> dict[str, Any]:
    """Everything in the database but TTLs, idle times and the liveness clock (time moves on by itself)."""
    state: dict[str, Any] = {}
    for key in sorted(await r.keys("*")):
        kind = (await r.type(key)).decode()
        if kind == "string":
            value: Any = await r.get(key)
        elif kind == "hash":
            value = await r.hgetall(key)
            if key.decode() == keys.LIVENESS:
                value.pop(b"seen_at")  # a clock: when a worker last wrote (the record's other fields stay)
        elif kind == "set":
            value = sorted(await r.smembers(key))
        elif kind == "zset":
            value = await r.zrange(key, 0, -1)  # members; scores are heartbeat clocks
        else:  # stream: entries, groups, and who holds which entry how often
            groups = await r.xinfo_groups(key)
            value = {
                "entries": await r.xrange(key),
                "groups": [(g["name"], g["last-delivered-id"], g["pending"]) for g in groups],
                "pending": [
                    (p["message_id"], p["consumer"], p["times_delivered"])
                    for g in groups
                    for p in await r.xpending_range(key, g["name"], "-", "+", 1000)
                ],
            }
        state[key.decode()] = (kind, value)
    return state


# Scripts whose reply is only logged, so a retry may answer differently: reclaim (which entry it
# took, for a log line; the worker then reads its own pending entries) and trim (how many entries
# it trimmed).
REPLY_MAY_DIFFER = {"reclaim", "trim"}


class Twice:
    """Runs each script of `store` (and of the other script tables given) twice per call;
    records the replies and checks the state."""

    def __init__(self, store: Store, *more: dict[str, Any]):
        self.store = store
        self.calls: list[tuple[str, Any, Any]] = []
        for scripts in (store.scripts, *more):
            for name, script in list(scripts.items()):
                scripts[name] = self._wrap(name, script)

    def _wrap(self, name, script):
        async def run(keys=None, args=None, client=None):
            if client is not None:  # inside a pipeline: no snapshot between (tested directly)
                return await script(keys=keys, args=args, client=client)
            first = await script(keys=keys, args=args)
            after_first = await snapshot(self.store.r)
            second = await script(keys=keys, args=args)
            after_second = await snapshot(self.store.r)
            assert after_second == after_first, f"{name} changed the state when run again"
            if name not in REPLY_MAY_DIFFER:
                assert second == first, f"{name} answered a retry {second!r}, not {first!r}"
            self.calls.append((name, first, second))
            return first

        return run

    def ran(self, name: str) -> list[tuple[Any, Any]]:
        return [(a, b) for n, a, b in self.calls if n == name]


@pytest.fixture
def twice(store: Store) -> Twice:
    return Twice(store)


async def _enqueue(store: Store, job_id: str, owner: str = "k1", key: str | None = None):
    return await store.enqueue(
        job_id, owner=owner, message=JobMessage(prompt="x"), body_hash="h", idempotency_key=key
    )


async def _take(store: Store, worker: str):
    await store.heartbeat(worker)
    entry_id, job_id = await store.poll(worker, 100)
    return job_id, await store.start(job_id, entry_id, worker)


async def test_enqueue_twice_is_one_job_one_entry_one_place(store: Store, twice: Twice):
    store.settings.queue_cap = 2
    store.settings.key_max_jobs = 0
    assert (await _enqueue(store, "j1", key="idem")).outcome == "ok"
    assert (await _enqueue(store, "j2")).outcome == "ok"
    assert (await _enqueue(store, "j3")).outcome == "full"
    assert (await _enqueue(store, "j4", key="idem")).outcome == "duplicate"
    assert [a == b for a, b in twice.ran("enqueue")] == [True] * 4  # the same answer both times
    assert await store.queue_depth() == 2 and await store.r.xlen(keys.JOBS) == 2
    assert [e.name for e in await store.read_events("j1")] == ["job.queued"]


async def test_the_key_quota_counts_queued_and_running_jobs_and_frees_on_the_end(store: Store, twice: Twice):
    store.settings.key_max_jobs = 2
    store.settings.api_keys = [SecretStr("a"), SecretStr("b")]  # quotas hold API keys to them
    assert (await _enqueue(store, "a1", owner="a")).outcome == "ok"
    assert (await _enqueue(store, "a2", owner="a")).outcome == "ok"
    assert (await _enqueue(store, "b1", owner="b")).outcome == "ok"  # quotas are per key
    job_id, started = await _take(store, "w1")
    assert (job_id, started.outcome) == ("a1", "run")
    assert (await _enqueue(store, "a3", owner="a")).outcome == "quota"  # a running job counts
    assert await store.finish("a1", 1, JobStatus.succeeded, "job.completed", {})
    assert (await _enqueue(store, "a3", owner="a")).outcome == "ok"


async def test_start_twice_is_one_attempt_and_one_job_started(store: Store, twice: Twice):
    await _enqueue(store, "j1")
    _, started = await _take(store, "w1")
    assert (started.outcome, started.attempt, started.takeover) == ("run", 1, False)
    first, second = twice.ran("start")[0]
    assert first == second  # the retry answers "run" for the same attempt, not a takeover
    job = await store.get_job("j1")
    assert (job["attempt"], job["failures"]) == ("1", "0")
    assert [e.name for e in await store.read_events("j1")] == ["job.queued", "job.started"]
    assert await store.queue_depth() == 0


async def test_emit_twice_adds_one_event(store: Store, twice: Twice):
    await _enqueue(store, "j1")
    await _take(store, "w1")
    args = [1, 1, "stage.started", '{"n":1}', 100, "stages", "[]"]
    emit = store.scripts["emit"]
    await emit(keys=[keys.job("j1"), keys.events("j1")], args=args)  # Twice runs it twice
    assert [e.name for e in await store.read_events("j1")] == ["job.queued", "job.started", "stage.started"]


async def test_finish_requeue_cancel_reclaim_trim_run_twice_change_nothing_more(store: Store, twice: Twice):
    store.settings.max_attempts = 2
    for job_id in ("done", "back", "retry", "queued", "running"):
        assert (await _enqueue(store, job_id)).outcome == "ok"
    assert (await _take(store, "w1"))[0] == "done"
    fields = {TRAJECTORY_FIELD: trajectory_key("done", 1)}  # the blob the worker wrote just before
    assert await store.finish("done", 1, JobStatus.succeeded, "job.completed", {"ok": True}, fields=fields)
    assert (await store.get_job("done"))[TRAJECTORY_FIELD] == "done/1/trajectory.json"
    assert (await _take(store, "w1"))[0] == "back"
    assert await store.requeue("back", 1, "handback") == "queued"
    # the handed-back entry is reclaimed by an idle worker, once
    assert (await store.reclaim("w2"))[0] == (await store.get_job("back"))["entry_id"]
    job_id, started = await _take(store, "w2")
    assert (job_id, started.attempt) == ("back", 2)
    assert (
        await store.requeue("back", 2, "retry", {"type": "generation_failed", "message": "boom"}) == "queued"
    )
    assert (await store.get_job("back"))["failures"] == "1"
    assert await store.cancel("queued") == ("canceled", None)
    await store.reclaim("w3")
    job_id, _ = await _take(store, "w3")
    assert job_id == "back"
    assert await store.requeue("back", 3, "retry", {"type": "generation_failed", "message": "boom"}) == "dead"
    job = await store.get_job("back")
    assert job["status"] == "failed" and '"boom"' in job["error"]
    assert (await _take(store, "w4"))[0] == "retry"
    job_id, started = await _take(store, "w5")  # the canceled job's entry: skipped
    assert (job_id, started.outcome) == ("queued", "skip")
    assert (await _take(store, "w5"))[0] == "running"
    assert (await store.cancel("running"))[0] == "canceling"
    await store.trim_queue()
    names = {n for n, _, _ in twice.calls}
    assert {"enqueue", "start", "finish", "requeue", "cancel", "reclaim", "trim", "reconcile"} <= names
    # a requeue run again answers as the first did (a worker retries it until the replicas have it)
    assert [first for first, _ in twice.ran("requeue")] == [second for _, second in twice.ran("requeue")]
    for job_id, terminal in (("done", "job.completed"), ("back", "job.failed"), ("queued", "job.canceled")):
        assert [e.name for e in await store.read_events(job_id)].count(terminal) == 1
    assert len(await store.dead_letters()) == 1


async def test_admission_sets_are_reconciled_against_the_job_hashes(store: Store):
    store.settings.queue_cap = 2
    assert (await _enqueue(store, "j1")).outcome == "ok"
    assert (await _enqueue(store, "j2")).outcome == "ok"
    # Drift, as a crash between two scripts of an older version could leave it: members whose
    # jobs are gone or no longer queued. The next admission that finds the set full checks it.
    await store.r.delete(keys.job("j1"))
    await store.r.hset(keys.job("j2"), "status", "succeeded")
    assert (await _enqueue(store, "j3")).outcome == "ok"
    assert await store.queue_depth() == 1


async def test_pause_continue_and_end_paused_run_twice_change_nothing_more(store: Store):
    steer = Steering(store.r, store.settings)
    twice = Twice(store, steer.scripts)
    assert (await _enqueue(store, "p1")).outcome == "ok"
    assert (await _take(store, "w1"))[0] == "p1"
    paused = Paused(1, Stage.plan, "a plan", {"seed": 1, "stages": [{"iteration": 1, "stage": "plan"}]})
    assert await steer.pause("p1", 1, await pause_of(steer, "p1", 1, paused)) == "paused"
    # The steer record is written by the fenced script, and names the attempt's trajectory blob.
    record = json.loads(await store.r.get(keys.steer("p1")))
    assert record["trajectory_key"] == trajectory_key("p1", 1) == "p1/1/trajectory.json"
    assert record["point"] == {"iteration": 1, "stage": "plan"} and "trajectory" not in record
    assert (await store.get_job("p1"))[TRAJECTORY_FIELD] == "p1/1/trajectory.json"
    assert await steer.pause("p1", 2, await pause_of(steer, "p1", 2, paused)) == "fenced"  # not the holder
    resumed = await steer.resume("p1", 1, {"job_id": "p1", "attempt": 1})  # continue.lua
    assert resumed.outcome == Resume.queued
    assert (await _take(store, "w1"))[0] == "p1"
    assert await steer.pause("p1", 2, await pause_of(steer, "p1", 2, paused)) == "paused"
    assert json.loads(await store.r.get(keys.steer("p1")))["trajectory_key"] == "p1/2/trajectory.json"
    assert await steer.cancel_paused("p1")
    assert {"pause", "continue", "end_paused"} <= {n for n, _, _ in twice.calls}
    names = [e.name for e in await store.read_events("p1")]
    assert names.count("job.paused") == 2 and names.count("job.resumed") == 1
    assert names[-1] == "job.canceled"


async def _paused(store: Store, steer: Steering, job_id: str, owner: str) -> int:
    """A job of `owner` queued, started and paused after its plan: its attempt."""
    assert (await _enqueue(store, job_id, owner=owner)).outcome == "ok"
    took, started = await _take(store, f"w-{job_id}")
    assert took == job_id
    paused = Paused(1, Stage.plan, "a plan", {"seed": 1, "stages": [{"iteration": 1, "stage": "plan"}]})
    pause = await pause_of(steer, job_id, started.attempt, paused)
    assert await steer.pause(job_id, started.attempt, pause) == "paused"
    await store.ack((await store.get_job(job_id))["entry_id"])
    return started.attempt


async def test_continue_passes_the_keys_quota_and_the_queue_cap_in_its_own_script(store: Store):
    store.settings.api_keys = [SecretStr("a"), SecretStr("b")]
    store.settings.key_max_jobs = 1
    store.settings.queue_cap = 2
    steer = Steering(store.r, store.settings)
    Twice(store, steer.scripts)
    for n in range(4):  # one at a time: each paused job holds no place in the quota
        await _paused(store, steer, f"a{n}", "a")
    await _paused(store, steer, "b0", "b")
    data = {"job_id": "", "attempt": 1}
    outcomes = [(await steer.resume(f"a{n}", 1, data)).outcome for n in range(3)]
    assert outcomes == [Resume.queued, Resume.quota, Resume.quota]
    assert await store.r.scard(keys.owner_active("a")) == 1  # never more than the quota
    assert [(await store.get_job(f"a{n}"))["status"] for n in range(3)] == ["queued", "paused", "paused"]
    # The queue cap holds for continues too: with a0 and b1 queued the queue is full.
    assert (await _enqueue(store, "b1", owner="b")).outcome == "ok"
    assert await store.queue_depth() == 2
    assert (await steer.resume("b0", 1, data)).outcome == Resume.full
    assert (await store.get_job("b0"))["status"] == "paused"


async def test_of_two_continues_at_once_exactly_one_wins_and_its_text_is_the_one_used(store: Store):
    steer = Steering(store.r, store.settings)
    attempt = await _paused(store, steer, "p1", "")
    record = await steer.get_steer("p1")
    edits = [{**record, "point": {**record["point"], "text": text}} for text in ("mine", "theirs")]
    data = {"job_id": "p1", "attempt": attempt}
    results = await asyncio.gather(*[steer.resume("p1", attempt, data, edit) for edit in edits])
    outcomes = sorted(r.outcome.value for r in results)
    assert outcomes == ["not_paused", "queued"]
    winner = edits[[r.outcome for r in results].index(Resume.queued)]
    assert (await steer.get_steer("p1"))["point"]["text"] == winner["point"]["text"]
    names = [e.name for e in await store.read_events("p1")]
    assert names.count("job.resumed") == 1
    # A continue of a pause that is over (the job ran on and paused again) is stale.
    _, started = await _take(store, "w2")
    paused = Paused(1, Stage.reflect, "fine", {"seed": 1, "stages": []})
    assert (
        await steer.pause("p1", started.attempt, await pause_of(steer, "p1", started.attempt, paused))
        == "paused"
    )
    assert (await steer.resume("p1", attempt, data, edits[0])).outcome == Resume.stale
    assert (await steer.get_steer("p1"))["point"]["stage"] == "reflect"  # the stale edit wrote nothing


async def test_a_fork_is_routed_to_an_idle_holder_even_before_its_heartbeat_catches_up(store: Store):
    steer = Steering(store.r, store.settings)
    Twice(store, steer.scripts)  # route's retry answers 1 again: the entry is the holder's now
    await _enqueue(store, "parent")
    assert (await _take(store, "holder"))[0] == "parent"
    await store.heartbeat("holder", "parent")  # the holder's beat names the job it runs

    async def fork_routed(child: str, holder: str = "holder") -> bool:
        await _enqueue(store, child)
        await store.r.hset(keys.job(child), "warm_worker", holder)
        entry_id, job_id = await store.poll("other", 100)
        assert job_id == child
        routed = await steer.route("other", entry_id, child)
        owner = (await store.r.xpending_range(keys.JOBS, keys.GROUP, entry_id, entry_id, 1))[0]
        assert owner["consumer"].decode() == ("holder" if routed else "other")
        assert await store.r.hget(keys.job(child), "warm_worker") is None  # routed once at most
        await store.ack(entry_id)
        return routed

    assert not await fork_routed("while-parent-runs")  # busy: the other worker rebuilds
    assert await store.finish("parent", 1, JobStatus.succeeded, "job.completed", {})
    assert await fork_routed("on-the-terminal-event")  # the beat is one behind: the holder is idle
    await store.heartbeat("holder")
    assert await fork_routed("after-the-next-beat")
    await store.drop_heartbeat("holder")
    assert not await fork_routed("holder-gone")
