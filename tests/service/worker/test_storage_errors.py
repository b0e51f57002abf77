"""The blob store's errors are the job's, never the worker's, and never a Redis outage: the worker loop
in-process against a real redis-server, with real blob stores that refuse (S3 without its bucket on
the session's S3 server, a local directory that cannot be written), one that is away for a moment
while a job is prepared, and a damaged input image. After each, the worker is still running, with
its pipeline, and takes the next job."""

from __future__ import annotations

import asyncio
import errno
import json

import pytest
from prometheus_client import generate_latest
from testkit.pipelines import ScriptedPipeline
from testkit.s3 import s3_settings
from testkit.workers import in_process_worker

from strokes.service.blobs import store as bloblib
from strokes.service.blobs.local import LocalBlobs
from strokes.service.queue.store import Store
from strokes.service.shared import images as imagelib
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.settings import Settings
from strokes.service.worker.metrics import WorkerMetrics

REQUEST = {"prompt": "a cube", "width": 32, "height": 32, "max_iterations": 1}
TERMINAL = ("job.completed", "job.failed", "job.canceled")


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "heartbeat_interval_s": 0.2,
            "lease_ttl_s": 1.0,
            "reclaim_interval_s": 0.1,
            "poll_block_ms": 100,
            "blob_retry_base_s": 0.01,
        }
    )


async def _submit(store: Store, job_id: str, *, input_image: bool = False) -> None:
    message = JobMessage(**REQUEST, input_image=input_image)
    enqueued = await store.enqueue(job_id, owner="", message=message, body_hash="h", idempotency_key=None)
    assert enqueued.outcome == "ok"


async def _ended(store: Store, job_id: str, timeout: float = 20.0) -> dict[str, str]:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        job = await store.get_job(job_id)
        if job and job["status"] in ("succeeded", "failed", "canceled"):
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"{job_id} did not end")


async def _terminal(store: Store, job_id: str) -> tuple[str, dict]:
    events = [e for e in await store.read_events(job_id) if e.name in TERMINAL]
    assert len(events) == 1, events
    return events[0].name, json.loads(events[0].data)


async def _refused_at_once_and_the_worker_lives(store: Store, settings: Settings, broken, cause: str) -> None:
    """A job through a worker on the `broken` store fails storage_unavailable with `cause`, at
    once; the worker lives on, and shows the store's state in its metrics."""
    metrics = WorkerMetrics()
    pipeline = ScriptedPipeline(steps=2)
    worker = in_process_worker(store.r, settings, "w1", pipeline, blobs=broken, metrics=metrics)
    task = asyncio.create_task(worker.run())
    try:
        await _submit(store, "refused")
        job = await _ended(store, "refused")
        name, data = await _terminal(store, "refused")
        assert (job["status"], name, data["error"]["type"]) == ("failed", "job.failed", "storage_unavailable")
        assert cause in data["error"]["message"] and "refused" in data["error"]["message"]
        assert job["attempt"] == "1" and job["failures"] == "0"  # at once, no takeover, no retries
        exposition = generate_latest(metrics.registry).decode()
        assert "strokes_blob_store_up 0.0" in exposition
        assert 'strokes_blob_store_state{state="refused"} 1.0' in exposition
        assert not task.done() and pipeline.runs == 1  # alive, its model loaded: no exit, no restart
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 10)
    assert worker.exit_code == 0


async def test_a_missing_bucket_fails_the_job_at_once_and_the_worker_lives(
    store: Store, fast: Settings, s3_server: str
):
    broken = s3_settings(fast, s3_server, "w/", s3_bucket="no-such-bucket")
    blobs = bloblib.open_store(broken)
    try:
        await _refused_at_once_and_the_worker_lives(
            store, broken, blobs, "the bucket no-such-bucket does not exist"
        )
    finally:
        await blobs.close()


async def test_a_directory_that_cannot_be_written_fails_the_job_at_once(
    store: Store, fast: Settings, tmp_path
):
    blocker = tmp_path / "file"
    blocker.write_text("in the way of the blob directory")
    broken = fast.model_copy(update={"blob_dir": blocker / "blobs"})
    await _refused_at_once_and_the_worker_lives(store, broken, LocalBlobs(broken), "not a directory")


class AwayForAWhile(LocalBlobs):
    """A local store whose reads fail (EIO) `failures` times, then work: the store away for a moment."""

    def __init__(self, settings: Settings, failures: int):
        super().__init__(settings)
        self.failures = failures

    def _get(self, key: str) -> bytes | None:
        if self.failures > 0:
            self.failures -= 1
            raise OSError(errno.EIO, "Input/output error")
        return super()._get(key)


async def test_a_store_away_while_the_job_is_prepared_defers_it_without_a_failure_mark(
    store: Store, fast: Settings
):
    settings = fast.model_copy(update={"blob_retries": 1})
    blobs = AwayForAWhile(settings, failures=2)  # one call's two tries fail: the next attempt reads
    await blobs.put("gen_defer/0/input", _png(32, 32))
    worker = in_process_worker(store.r, settings, "w1", ScriptedPipeline(steps=2), blobs=blobs)
    task = asyncio.create_task(worker.run())
    try:
        await _submit(store, "gen_defer", input_image=True)
        job = await _ended(store, "gen_defer")
        assert job["status"] == "succeeded"
        assert (job["failures"], job["deferrals"], job["attempt"]) == ("0", "1", "2")
        queued = [json.loads(e.data) for e in await store.read_events("gen_defer") if e.name == "job.queued"]
        assert queued[1]["reason"] == "defer" and queued[1]["error"]["type"] == "storage_unavailable"
        started = [
            json.loads(e.data) for e in await store.read_events("gen_defer") if e.name == "job.started"
        ]
        assert [s["takeover"] for s in started] == [False, False]
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 10)


async def test_a_damaged_input_fails_invalid_input_at_once(store: Store, fast: Settings):
    blobs = LocalBlobs(fast)
    await blobs.put("gen_damaged/0/input", _png(32, 32)[:60])  # a truncated PNG: PIL raises OSError
    pipeline = ScriptedPipeline(steps=2)
    worker = in_process_worker(store.r, fast, "w1", pipeline, blobs=blobs)
    task = asyncio.create_task(worker.run())
    try:
        await _submit(store, "gen_damaged", input_image=True)
        await _submit(store, "gen_next")
        job = await _ended(store, "gen_damaged")
        _, data = await _terminal(store, "gen_damaged")
        assert (job["status"], data["error"]["type"], job["attempt"]) == ("failed", "invalid_input", "1")
        assert (await _ended(store, "gen_next"))["status"] == "succeeded"
        assert pipeline.runs == 1 and not task.done()
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 10)


def _png(width: int, height: int) -> bytes:
    import numpy as np

    return imagelib.encode_png(np.full((height, width, 3), 120, np.uint8))
