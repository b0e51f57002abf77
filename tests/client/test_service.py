"""The Python client (clients/python) against the real service: API and worker subprocesses, the
tiny model, a real redis-server. Covers create/get/list/cancel/wait/events/download in both
flavours, a reconnect mid-stream across an API restart, the 429 retry with Retry-After, and
steering (pause, resume with an edited plan, fork with an edited stage, follow-up, cancel while
paused, `wait` stopping at a pause or waiting through it)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image
from strokes_client import (
    APIError,
    AsyncClient,
    Client,
    GenerationFailed,
    ImageProgress,
    JobCanceled,
    JobCompleted,
    JobPaused,
    JobQueued,
    JobResumed,
    ParentRef,
    StageCompleted,
    StageStarted,
    TextDelta,
)
from testkit.jobs import QUICK, SLOW
from testkit.paths import ROOT
from testkit.processes import Proc, env_with, start_api, start_worker, wait_for

from strokes.service.cli.serve import free_port

pytestmark = pytest.mark.slow

MEDIUM = {
    **QUICK,
    "width": 128,
    "height": 128,
    "max_iterations": 2,
    "draft": {"steps": 30},
    "refine": {"steps": 30},
}


@dataclass
class Service:
    base: str
    redis_url: str
    logdir: Path


def _db(redis_server, n: int) -> str:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{n}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="module")
def service(redis_server, tiny_checkpoint, tmp_path_factory) -> Iterator[Service]:
    """One API and one worker for the module, on a database of their own."""
    logdir = tmp_path_factory.mktemp("client-logs")
    url = _db(redis_server, 2)
    api, base = start_api(url, logdir)
    try:
        worker = start_worker(url, tiny_checkpoint, logdir, "client-w1")
        try:
            yield Service(base, url, logdir)
        finally:
            worker.stop()
    finally:
        api.stop()


def test_sync_client_end_to_end(service: Service, tmp_path: Path):
    with Client(service.base) as client:
        job = client.create(QUICK, seed=11)
        assert job.status in ("queued", "running") and job.request["seed"] == 11
        events = list(client.events(job.id))
        assert isinstance(events[0], JobQueued) and isinstance(events[-1], JobCompleted)
        assert sum(e.terminal for e in events) == 1
        assert any(isinstance(e, TextDelta) and e.delta for e in events)
        assert {e.stage for e in events if isinstance(e, StageStarted)} == {
            "plan",
            "draft",
            "reflect",
            "refine",
        }
        progress = [e for e in events if isinstance(e, ImageProgress) and e.stage == "draft"]
        assert [e.step for e in progress] == list(range(1, progress[-1].steps + 1))
        draft = next(e for e in events if isinstance(e, StageCompleted) and e.stage == "draft")
        assert draft.image is not None and draft.image.id == "it1-draft"
        assert draft.steps == progress[-1].steps == QUICK["draft"]["steps"] - 1  # one step count

        done = client.wait(job.id, timeout_s=60)
        assert done.status == "succeeded" and done.final_image == events[-1].final_image
        png = client.download_image(job.id, done.final_image, path=tmp_path / "final.png")
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        assert (tmp_path / "final.png").read_bytes() == png
        jpeg = client.download_image(job.id, "it1-draft", format="jpeg")
        assert jpeg[:2] == b"\xff\xd8"
        assert client.trajectory(job.id)["final_image"] == done.final_image.id

        assert client.list(limit=1).data[0].id == job.id
        assert job.id in [j.id for j in client.iter_jobs(status="succeeded", page_size=1)]
        # the same Idempotency-Key and body: the same job, not a second one
        first = client.create(QUICK, seed=12, idempotency_key="client-key-1")
        again = client.create(QUICK, seed=12, idempotency_key="client-key-1")
        assert first.id == again.id
        with pytest.raises(APIError) as info:
            client.get("gen_" + "x" * 22)
        assert info.value.status == 404 and info.value.type == "not_found"


async def test_async_client_cancel_wait_and_list(service: Service):
    async with AsyncClient(service.base) as client:
        quick = await client.create(prompt=QUICK["prompt"], width=64, height=64, max_iterations=1, seed=21)
        slow = await client.create(SLOW, wait=0.5)  # Prefer: wait, not long enough: 202
        assert slow.status in ("queued", "running")
        names = []
        async for event in client.events(slow.id):
            names.append(event.name)
            if isinstance(event, ImageProgress):
                canceled = await client.cancel(slow.id)
                assert canceled.cancel_requested or canceled.status == "canceled"
        assert names[-1] == "job.canceled"
        assert (await client.wait(slow.id)).status == "canceled"
        finished = await client.wait(quick.id, timeout_s=60)
        assert finished.status == "succeeded"
        png = await client.download_image(quick.id, finished.final_image)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        listed = [job.id async for job in client.iter_jobs(page_size=1)]
        assert listed.index(slow.id) < listed.index(quick.id)  # newest first
        assert [j.id for j in (await client.list(status="canceled")).data][0] == slow.id
        waited = await client.create(QUICK, seed=22, wait=60)  # Prefer: wait=60: the finished job
        assert waited.status == "succeeded" and waited.final_image is not None


PLAN = "<ins>draw a green cube</ins> <des>a green cube on a blue sphere</des>"
REFLECTION = "The intermediate step is correct. The cube is on the sphere."


def test_sync_client_steering_pause_resume_with_an_edited_plan_fork_and_follow_up(service: Service):
    with Client(service.base) as client:
        job = client.create(QUICK, seed=51, pause_after=["plan"])
        paused = client.wait(job.id, timeout_s=60)  # returns at the pause
        assert paused.status == "paused" and paused.is_paused and not paused.done
        assert paused.paused is not None and (paused.paused.iteration, paused.paused.stage) == (1, "plan")
        assert paused.paused.expires_at > time.time() and paused.paused.text
        pause_event = None
        for event in client.events(job.id):  # the stream stays open while paused: stop at the pause
            if isinstance(event, JobPaused):
                pause_event = event
                break
        assert pause_event is not None and pause_event.text == paused.paused.text
        assert pause_event.stage == "plan" and pause_event.expires_at == paused.paused.expires_at

        resumed = client.resume(job.id, text=PLAN)
        assert resumed.status in ("queued", "running") and resumed.paused is None
        done = client.wait(job.id, timeout_s=60, raise_on_failure=True)
        assert done.status == "succeeded" and done.stages[0]["text"] == PLAN
        assert [s["stage"] for s in done.stages] == ["plan", "draft", "reflect", "refine"]
        after = list(client.events(job.id, after=pause_event.id))
        assert isinstance(after[0], JobResumed) and after[0].edited and after[0].stage == "plan"
        assert isinstance(after[-1], JobCompleted) and after[-1].attempt == 2
        with pytest.raises(APIError) as info:
            client.resume(job.id)
        assert info.value.status == 409

        fork = client.fork(job.id, 1, "reflect", text=REFLECTION)
        assert fork.parent == ParentRef(job.id, 1, "reflect") and fork.request["fork"]["text"] == REFLECTION
        fork = client.wait(fork.id, timeout_s=60, raise_on_failure=True)
        assert [(s["stage"], s.get("text")) for s in fork.stages[:2]] == [("plan", PLAN), ("draft", None)]
        # the inherited draft is the parent's, bitwise
        assert client.download_image(fork.id, "it1-draft") == client.download_image(job.id, "it1-draft")
        assert (fork.stages[2]["text"], fork.stages[2]["verdict"]) == (REFLECTION, "correct")
        assert fork.final_image is not None and fork.final_image.id == "it1-draft"

        follow = client.follow_up(job.id, "now make the cube green")
        assert follow.parent == ParentRef(job.id, None, None)
        follow = client.wait(follow.id, timeout_s=60, raise_on_failure=True)
        assert follow.iterations == 2 and follow.final_image.id.startswith("it2-")
        with pytest.raises(APIError) as info:
            client.fork(job.id, 1, "draft", text="a green cube")
        assert info.value.status == 422 and info.value.param == "fork.text"


async def test_async_client_steering_wait_through_pauses_and_cancel_while_paused(service: Service):
    async with AsyncClient(service.base) as client:
        job = await client.create(QUICK, seed=52, pause_after=["plan", "reflect"])
        # A second waiter that someone else's steering does not stop: it returns only at the end.
        through = asyncio.create_task(client.wait(job.id, timeout_s=120, through_pauses=True))
        paused = await client.wait(job.id, timeout_s=60)
        assert paused.status == "paused" and paused.paused.stage == "plan"
        await client.resume(job.id)
        # wait follows the events from the start: the old pause at the plan does not stop it
        paused = await client.wait(job.id, timeout_s=60)
        assert paused.status == "paused" and (paused.paused.iteration, paused.paused.stage) == (1, "reflect")
        assert paused.attempt == 2 and [s["stage"] for s in paused.stages] == ["plan", "draft", "reflect"]

        canceled = await client.cancel(job.id)
        assert canceled.status == "canceled" and canceled.paused is None  # at once: no worker holds it
        ended = await through
        assert ended.status == "canceled"  # it waited through both pauses, to the end
        with pytest.raises(GenerationFailed):
            await client.wait(job.id, raise_on_failure=True)
        events = [event async for event in client.events(job.id)]
        assert isinstance(events[-1], JobCanceled) and events[-1].reason == "canceled while paused"
        names = [event.name for event in events]
        assert names.count("job.paused") == 2 and names.count("job.resumed") == 1
        assert names[-1] == "job.canceled" and sum(n in ("job.completed", "job.failed") for n in names) == 0


def test_events_resume_across_an_api_restart(service: Service):
    """The API dies mid-stream (SIGKILL) and comes back on the same port: the client reconnects
    with Last-Event-ID and the events it yields are exactly the job's log, once each, in order."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def api() -> Proc:
        proc = Proc(
            ["api", "--port", str(port)],
            env_with(service.redis_url),
            service.logdir / f"api-{time.monotonic_ns()}.log",
        )
        wait_for(lambda: _healthy(base, proc), 30, 0.1, "the API to start")
        return proc

    first = api()
    restarted: list[Proc] = []
    try:
        with Client(base, max_retries=20, backoff_s=0.2, max_backoff_s=1) as client:
            job = client.create(MEDIUM, seed=31)
            seen = []
            for event in client.events(job.id):
                seen.append(event)
                if isinstance(event, ImageProgress) and not restarted:
                    first.signal(signal.SIGKILL)
                    first.wait(10)
                    restarted.append(api())
            assert client.reconnects >= 1
        with Client(service.base) as other:
            full = list(other.events(job.id))
        assert [e.id for e in seen] == [e.id for e in full]
        assert [e.name for e in seen] == [e.name for e in full]
        assert seen[-1].name == "job.completed"
    finally:
        first.stop()
        for proc in restarted:
            proc.stop()


def _healthy(base: str, proc: Proc) -> bool:
    if not proc.alive():
        raise RuntimeError("the API exited:\n" + proc.output())
    try:
        return httpx.get(base + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_create_retries_a_429_after_retry_after_with_the_same_key(redis_server, tmp_path: Path):
    url = _db(redis_server, 3)
    api, base = start_api(url, tmp_path, queue_cap=1, mean_job_seconds=1)  # no worker: jobs wait
    try:
        blocker = httpx.post(base + "/v1/generations", json=QUICK, timeout=10).json()
        log: list[tuple[str, int | None, str | None, float]] = []

        def on_request(request: httpx.Request) -> None:
            log.append((request.method, None, request.headers.get("idempotency-key"), time.monotonic()))

        def on_response(response: httpx.Response) -> None:
            log.append((response.request.method, response.status_code, None, time.monotonic()))
            if response.status_code == 429:  # make room: the retry must then get in
                httpx.delete(f"{base}/v1/generations/{blocker['id']}", timeout=10)

        hooks = {"request": [on_request], "response": [on_response]}
        with Client(base, http=httpx.Client(event_hooks=hooks)) as client:
            job = client.create(QUICK, seed=41)
        assert job.status == "queued"
        statuses = [status for method, status, _, _ in log if method == "POST" and status]
        assert statuses == [429, 202]
        keys_sent = [key for method, status, key, _ in log if method == "POST" and status is None]
        assert len(keys_sent) == 2 and keys_sent[0] == keys_sent[1] and keys_sent[0]
        got_429 = next(t for _, status, _, t in log if status == 429)
        retried = [t for method, status, _, t in log if method == "POST" and status is None][1]
        assert retried - got_429 >= 0.95  # Retry-After: 1 was honoured

        with Client(base, max_retries=0) as impatient, pytest.raises(APIError) as info:
            impatient.create(QUICK, seed=42)  # the queue holds `job` again: full
        assert info.value.status == 429 and info.value.retry_after == 1
    finally:
        api.stop()


def _run_readme_script(service: Service, tmp_path: Path, heading: str) -> str:
    """The first Python block after `heading` in clients/python/README.md, run as written against
    the service; its output."""
    readme = (ROOT / "clients" / "python" / "README.md").read_text()
    section = readme.split(f"\n{heading}\n", 1)[1]
    script = section.split("```python\n", 1)[1].split("```", 1)[0]
    script = script.replace("http://127.0.0.1:8000", service.base)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "clients" / "python")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_readme_script_runs(service: Service, tmp_path: Path):
    """The complete script of clients/python/README.md, as written, against the service."""
    _run_readme_script(service, tmp_path, "## A complete script")
    with Image.open(tmp_path / "out" / "final.png") as final:
        assert final.size == (256, 256)
    trajectory = json.loads((tmp_path / "out" / "trajectory.json").read_text())
    for stage in trajectory["stages"]:
        if "image" in stage:
            assert (tmp_path / "out" / f"{stage['image']}.png").exists()


def test_the_readme_steering_script_runs(service: Service, tmp_path: Path):
    """The steering script of clients/python/README.md, as written: pause, own plan, fork, follow-up."""
    out = _run_readme_script(service, tmp_path, "## Steering")
    paused, resumed, fork, follow = out.splitlines()
    assert paused.startswith("paused plan ")
    plan = "<ins>draw a red cube on a blue sphere</ins> <des>a glossy red cube on a matte blue sphere</des>"
    assert resumed == f"succeeded {plan}"
    assert fork.startswith("fork of ParentRef(") and fork.endswith(
        "iteration=1, stage='reflect') -> it1-refine"
    )
    assert follow.startswith("follow-up: 2 iterations, final image it2-")
    with Image.open(tmp_path / "green.png") as final:
        assert final.size == (256, 256)
