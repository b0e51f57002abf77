"""The worker loop in-process against a real redis-server, driving a scripted pipeline whose pace
the test controls: retries into the dead letters, leases, fencing, cancel and hand-back."""

from __future__ import annotations

import asyncio
import json

import pytest
from testkit.pipelines import ScriptedPipeline
from testkit.workers import in_process_worker

from strokes.model.spec.events import StageCompleted
from strokes.service.blobs.local import LocalBlobs
from strokes.service.queue import keys
from strokes.service.queue.store import Store
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.settings import Settings
from strokes.service.worker.loop import Worker

REQUEST = {"prompt": "a cube", "width": 32, "height": 32, "max_iterations": 1}


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "heartbeat_interval_s": 0.2,
            "lease_ttl_s": 1.0,
            "reclaim_interval_s": 0.1,
            "poll_block_ms": 100,
        }
    )


async def _submit(store: Store, job_id: str, request: dict | None = None) -> None:
    result = await store.enqueue(
        job_id, owner="", message=JobMessage(**(request or REQUEST)), body_hash="h", idempotency_key=None
    )
    assert result.outcome == "ok"


class RecordingPipeline(ScriptedPipeline):
    """The scripted pipeline whose stage.completed events carry the trajectory so far, as the
    model's do; it records what it sent."""

    sent: list[dict] | None = None

    def run(self, params, should_cancel, options):
        stages: list[str] = []
        self.sent = []
        for event in super().run(params, should_cancel, options):
            if isinstance(event, StageCompleted):
                stages.append(event.stage.value)
                event.trajectory = {"version": 1, "stages": list(stages)}
                self.sent.append(event.trajectory)
            yield event


class RecordingBlobs(LocalBlobs):
    """The local blob store, keeping a list of what was put (key, bytes) in order."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.puts: list[tuple[str, bytes]] = []

    async def put(self, key: str, data: bytes) -> None:
        self.puts.append((key, data))
        await super().put(key, data)


def _worker(store: Store, settings: Settings, name: str, pipeline: ScriptedPipeline) -> Worker:
    return in_process_worker(store.r, settings, name, pipeline)


async def _until(predicate, timeout: float = 10.0, what: str = ""):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def _status(store: Store, job_id: str) -> str:
    return (await store.get_job(job_id))["status"]


async def _terminal(store: Store, job_id: str) -> str:
    async def check():
        status = await _status(store, job_id)
        return status if status in ("succeeded", "failed", "canceled") else None

    return await _until(check, what=f"{job_id} to end")


async def _stop(*tasks_and_workers) -> None:
    for worker, task in tasks_and_workers:
        worker.request_stop()
        await asyncio.wait_for(task, 10)


async def test_job_runs_to_one_completed_event_with_stored_images(store: Store, fast: Settings):
    pipeline = RecordingPipeline(steps=3)
    blobs = RecordingBlobs(fast)
    worker = in_process_worker(store.r, fast, "w1", pipeline, blobs=blobs)
    task = asyncio.create_task(worker.run())
    await _submit(store, "j1")
    assert await _terminal(store, "j1") == "succeeded"
    await _stop((worker, task))
    # The trajectory so far went to the attempt's blob at stage ends (the latest of each batch of
    # events sent together), then the whole one.
    written = [json.loads(data) for key, data in blobs.puts if key == "j1/1/trajectory.json"]
    *stage_ends, whole = written
    assert whole == {"version": 1, "prompt": "a cube"}
    assert stage_ends and stage_ends == sorted(stage_ends, key=pipeline.sent.index)  # each one sent
    names = [e.name for e in await store.read_events("j1")]
    assert names[:3] == ["job.queued", "job.started", "stage.started"]
    assert names.count("job.completed") == 1 and names[-1] == "job.completed"
    job = await store.get_job("j1")
    assert json.loads(job["final_image"])["id"] == "it1-refine"
    assert (await worker.blobs.get("j1/1/it1-draft"))[:8] == b"\x89PNG\r\n\x1a\n"  # in the blob store
    # The whole trajectory replaced the stages-so-far blob; Redis holds its key only.
    assert job["trajectory_key"] == "j1/1/trajectory.json"
    assert json.loads(await blobs.get("j1/1/trajectory.json")) == whole
    assert worker.metrics.jobs.labels("succeeded")._value.get() == 1


async def test_poison_job_fails_on_every_attempt_then_goes_to_dead_letters(store: Store, fast: Settings):
    settings = fast.model_copy(update={"max_attempts": 3})
    pipeline = ScriptedPipeline(fail=True)
    worker = _worker(store, settings, "w1", pipeline)
    task = asyncio.create_task(worker.run())
    await _submit(store, "j1")
    assert await _terminal(store, "j1") == "failed"
    await _stop((worker, task))
    assert pipeline.runs == 3
    events = await store.read_events("j1")
    assert [e.name for e in events].count("job.failed") == 1
    failed = json.loads(events[-1].data)
    assert failed["error"]["type"] == "generation_failed" and "poisoned input" in failed["error"]["message"]
    assert [d["job_id"] for d in await store.dead_letters()] == ["j1"]
    assert (await store.r.xpending(keys.JOBS, keys.GROUP))["pending"] == 0


async def test_slow_live_worker_is_not_robbed_by_another_worker(store: Store, fast: Settings):
    # 40 steps of 0.1 s per image, two images: ~8 s, eight times the 1 s lease.
    slow = _worker(store, fast, "slow", ScriptedPipeline(steps=40, step_s=0.1))
    slow_task = asyncio.create_task(slow.run())
    await _submit(store, "j1")
    await _until(lambda: _status(store, "j1"), what="start")
    await _until(lambda: store.r.hget(keys.job("j1"), "worker"), what="the slow worker to take it")
    thief = _worker(store, fast, "thief", ScriptedPipeline())
    thief_task = asyncio.create_task(thief.run())
    assert await _terminal(store, "j1") == "succeeded"
    await _stop((slow, slow_task), (thief, thief_task))
    events = await store.read_events("j1")
    started = [json.loads(e.data) for e in events if e.name == "job.started"]
    assert [s["worker"] for s in started] == ["slow"]
    assert {e.attempt for e in events if e.name != "job.queued"} == {1}


async def test_cancel_stops_running_job_within_one_step(store: Store, fast: Settings):
    pipeline = ScriptedPipeline(steps=200, step_s=0.02)
    worker = _worker(store, fast, "w1", pipeline)
    task = asyncio.create_task(worker.run())
    await _submit(store, "j1")

    async def progressing():
        return any(e.name == "image.progress" for e in await store.read_events("j1"))

    await _until(progressing, what="denoising to start")
    assert (await store.cancel("j1"))[0] == "canceling"
    assert await _terminal(store, "j1") == "canceled"
    await _stop((worker, task))
    assert pipeline.steps_after_cancel[-1] <= 1
    names = [e.name for e in await store.read_events("j1")]
    assert names[-1] == "job.canceled" and names.count("job.canceled") == 1
    assert sum(n == "image.progress" for n in names) < 20


async def test_stale_attempt_stops_and_writes_nothing_after_losing_its_lease(store: Store, fast: Settings):
    stale = _worker(store, fast, "w1", ScriptedPipeline(steps=200, step_s=0.02))
    task = asyncio.create_task(stale.run())
    await _submit(store, "j1")

    async def progressing():
        return any(e.name == "image.progress" for e in await store.read_events("j1"))

    await _until(progressing, what="denoising to start")

    # w1's heartbeats stop reaching Redis (a paused or partitioned process); its lease runs out.
    async def silent(*args, **kwargs):
        return None

    stale.store.heartbeat = silent
    await store.r.delete(keys.heartbeat("w1"))
    taker = _worker(store, fast, "w2", ScriptedPipeline(steps=2))
    taker_task = asyncio.create_task(taker.run())
    assert await _terminal(store, "j1") == "succeeded"
    await _until(lambda: asyncio.sleep(0, stale.job is None), what="the stale attempt to stop")
    # Once its job is dropped, the stale attempt's publisher is closed: it can write no more.
    events = await store.read_events("j1")
    takeover = next(i for i, e in enumerate(events) if e.name == "job.started" and e.attempt == 2)
    assert all(e.attempt == 2 for e in events[takeover:])  # nothing from attempt 1 after it
    assert [e.name for e in events].count("job.completed") == 1
    job = await store.get_job("j1")
    assert job["attempt"] == "2" and job["trajectory_key"] == "j1/2/trajectory.json"
    await _stop((stale, task), (taker, taker_task))
    assert stale.metrics.jobs.labels("lost")._value.get() == 1


async def test_stop_request_hands_the_running_job_back_to_another_worker(store: Store, fast: Settings):
    first = _worker(store, fast, "w1", ScriptedPipeline(steps=200, step_s=0.02))
    first_task = asyncio.create_task(first.run())
    await _submit(store, "j1")
    await _until(lambda: store.r.hget(keys.job("j1"), "worker"), what="start")
    first.request_stop()
    await asyncio.wait_for(first_task, 60)  # a deadline for the exit, not a timing
    assert await _status(store, "j1") == "queued"
    second = _worker(store, fast, "w2", ScriptedPipeline(steps=2))
    second_task = asyncio.create_task(second.run())
    assert await _terminal(store, "j1") == "succeeded"
    await _stop((second, second_task))
    events = await store.read_events("j1")
    queued = [json.loads(e.data) for e in events if e.name == "job.queued"]
    assert queued[-1]["reason"] == "handback"
    assert [json.loads(e.data)["worker"] for e in events if e.name == "job.started"] == ["w1", "w2"]
    assert int(await store.r.hget(keys.job("j1"), "failures")) == 0  # a hand-back is no failure
