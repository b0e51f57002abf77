"""A job never kills its worker: the worker loop in-process against a real redis-server, with
pipelines that misbehave in every way a job can (no image, broken events, a fatal device error,
a deadline), each followed by a job that must still run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from testkit.pipelines import ScriptedPipeline
from testkit.workers import in_process_worker

from strokes.model.spec.events import NO_IMAGE_MESSAGE, Done, ImageCompleted, Stage, StageStarted
from strokes.model.spec.params import GenerationParams, RunOptions
from strokes.service.queue import keys
from strokes.service.queue.store import Store
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.settings import Settings
from strokes.service.worker.loop import EXIT_FATAL, Worker

REQUEST = {"prompt": "a cube", "width": 32, "height": 32, "max_iterations": 1}


class Misbehaving(ScriptedPipeline):
    """Runs like ScriptedPipeline, except for prompts naming a misbehaviour."""

    def run(
        self, params: GenerationParams, should_cancel: Callable[[], bool], options: RunOptions = RunOptions()
    ) -> Iterator:
        if params.prompt == "no image":  # the interleaved model stopping before it draws
            yield StageStarted(1, Stage.plan)
            yield Done(None, 0, 0.01, {}, {"version": 1})
            return
        if params.prompt == "bad pixels":  # an image the encoder cannot take
            yield ImageCompleted(1, Stage.draft, "it1-draft", np.zeros((2,), np.float64))
            return
        if params.prompt == "device error":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield from super().run(params, should_cancel, options)


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


async def _submit(store: Store, job_id: str, prompt: str = "a cube") -> None:
    message = JobMessage(**{**REQUEST, "prompt": prompt})
    assert (
        await store.enqueue(job_id, owner="", message=message, body_hash="h", idempotency_key=None)
    ).outcome == "ok"


async def _terminal(store: Store, job_id: str, timeout: float = 20.0) -> dict[str, str]:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        job = await store.get_job(job_id)
        if job and job["status"] in ("succeeded", "failed", "canceled"):
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"{job_id} did not end")


def _worker(store: Store, settings: Settings, name: str) -> Worker:
    return in_process_worker(store.r, settings, name, Misbehaving(steps=2))


async def _failed_event(store: Store, job_id: str) -> dict:
    events = await store.read_events(job_id)
    terminal = [e for e in events if e.name in ("job.completed", "job.failed", "job.canceled")]
    assert len(terminal) == 1
    assert terminal[0].name == "job.failed"
    return json.loads(terminal[0].data)["error"]


async def test_a_generation_without_an_image_fails_clearly_and_the_worker_takes_the_next_job(
    store: Store, fast: Settings
):
    worker = _worker(store, fast, "w1")
    task = asyncio.create_task(worker.run())
    await _submit(store, "empty", "no image")
    await _submit(store, "next")
    assert (await _terminal(store, "empty"))["status"] == "failed"
    assert await _failed_event(store, "empty") == {"type": "no_image", "message": NO_IMAGE_MESSAGE}
    assert (await _terminal(store, "next"))["status"] == "succeeded"
    assert not task.done()
    worker.request_stop()
    await asyncio.wait_for(task, 10)
    assert (await store.r.xpending(keys.JOBS, keys.GROUP))["pending"] == 0


async def test_an_image_the_encoder_refuses_fails_the_job_with_its_cause_not_the_worker(
    store: Store, fast: Settings
):
    worker = _worker(store, fast.model_copy(update={"max_attempts": 2}), "w1")
    task = asyncio.create_task(worker.run())
    await _submit(store, "bad", "bad pixels")
    await _submit(store, "next")
    assert (await _terminal(store, "bad"))["status"] == "failed"
    error = await _failed_event(store, "bad")
    assert error["type"] == "generation_failed" and "Error" in error["message"]
    assert (await _terminal(store, "next"))["status"] == "succeeded"
    worker.request_stop()
    await asyncio.wait_for(task, 10)


async def test_a_job_that_breaks_the_device_on_every_attempt_ends_with_that_cause(
    store: Store, fast: Settings
):
    settings = fast.model_copy(update={"max_attempts": 2})
    await _submit(store, "poison", "device error")
    for name in ("w1", "w2"):  # each worker hands the job back with its cause, then exits
        worker = _worker(store, settings, name)
        await asyncio.wait_for(worker.run(), 20)
        assert worker.exit_code == EXIT_FATAL
    job = await store.get_job("poison")
    assert job["status"] == "failed"
    error = await _failed_event(store, "poison")
    assert error["type"] == "generation_failed" and "CUDA error: an illegal memory access" in error["message"]
    assert [d["job_id"] for d in await store.dead_letters()] == ["poison"]


async def test_a_job_past_its_deadline_fails_with_deadline_exceeded(store: Store, fast: Settings):
    settings = fast.model_copy(update={"job_deadline_s": 0.5})
    worker = in_process_worker(store.r, settings, "w1", ScriptedPipeline(steps=400, step_s=0.01))
    task = asyncio.create_task(worker.run())
    await _submit(store, "long")
    assert (await _terminal(store, "long"))["status"] == "failed"
    assert (await _failed_event(store, "long"))["type"] == "deadline_exceeded"
    worker.request_stop()
    await asyncio.wait_for(task, 10)


async def test_a_message_of_a_version_it_does_not_know_fails_as_invalid_and_the_worker_goes_on(
    store: Store, fast: Settings
):
    """A newer API's job during a rolling upgrade: refused, not misread (the message's version)."""
    newer = JobMessage(**REQUEST).model_copy(update={"version": 2})
    enqueued = await store.enqueue("newer", owner="", message=newer, body_hash="h", idempotency_key=None)
    assert enqueued.outcome == "ok"
    await _submit(store, "next")
    worker = _worker(store, fast, "w1")
    task = asyncio.create_task(worker.run())
    assert (await _terminal(store, "newer"))["status"] == "failed"
    assert (await _failed_event(store, "newer"))["type"] == "invalid_job"
    assert (await _terminal(store, "next"))["status"] == "succeeded"
    worker.request_stop()
    await asyncio.wait_for(task, 10)
