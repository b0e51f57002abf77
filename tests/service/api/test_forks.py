"""Forks at the API, in-process (ASGI) against a real redis-server, without workers: a fork is an
ordinary job for admission (queue cap, 429) and idempotency, and takes its parent's request.

The parent is a real tiny-model run whose results are written where a worker writes them (job hash
status, image fields and trajectory reference; images and trajectory in the blob store), so the
API sees a finished job."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
import torch
from pydantic import SecretStr
from testkit.asgi import SMALL, AppClient, black_png, error_of

from strokes.model.generation.loading import load_engine
from strokes.model.generation.pipeline import Pipeline
from strokes.model.spec.events import ImageCompleted, Paused, Stage
from strokes.model.spec.params import GenerationParams, ImageSettings, TextSettings
from strokes.service.blobs import store as blobs
from strokes.service.blobs.local import LocalBlobs
from strokes.service.queue import keys
from strokes.service.queue.steering import Steering
from strokes.service.queue.store import Store
from strokes.service.shared import images as imagelib
from strokes.service.shared.messages import JobMessage
from strokes.service.shared.settings import Settings
from strokes.service.shared.wire import TRAJECTORY_FIELD, encode_trajectory, trajectory_key
from strokes.service.worker.steering import pause_of, run_options


@pytest.fixture(scope="module")
def finished_run(tiny_checkpoint):
    torch.set_num_threads(1)
    engine = load_engine(tiny_checkpoint, device="cpu", dtype=torch.float32)
    text = TextSettings(max_tokens=4)
    params = GenerationParams(
        prompt=SMALL["prompt"],
        width=64,
        height=64,
        max_iterations=1,
        draft=ImageSettings(steps=3),
        refine=ImageSettings(steps=3),
        plan=text,
        reflect=text,
        seed=5,
    )
    events = list(Pipeline(engine).run(params))
    return events[-1].trajectory, {e.image_id: e.pixels for e in events if isinstance(e, ImageCompleted)}


async def _finish(store: Store, job_id: str, trajectory: dict, images: dict) -> None:
    """What the worker's attempt 1 writes for a succeeded job: blobs first, then the references."""
    fields = {"status": "succeeded", "attempt": "1", TRAJECTORY_FIELD: trajectory_key(job_id, 1)}
    blob_store = blobs.open_store(store.settings)
    for image_id, pixels in images.items():
        await blob_store.put(imagelib.storage_key(job_id, 1, image_id), imagelib.encode_png(pixels))
        fields[f"img:{image_id}"] = json.dumps({"id": image_id, "attempt": 1})
    await blob_store.put(trajectory_key(job_id, 1), encode_trajectory(trajectory))
    await store.r.hset(keys.job(job_id), mapping=fields)


async def test_a_fork_is_admitted_like_any_job_and_takes_its_parents_request(
    settings: Settings, store: Store, finished_run
):
    trajectory, images = finished_run
    async with AppClient(settings.model_copy(update={"queue_cap": 3})) as client:
        parent = (await client.post("/v1/generations", json={**SMALL, "seed": None})).json()
        await _finish(store, parent["id"], trajectory, images)
        fork = {"fork": {"job_id": parent["id"], "iteration": 1, "stage": "reflect"}}
        headers = {"Idempotency-Key": "fork-1"}
        replies = await asyncio.gather(
            *[client.post("/v1/generations", json=fork, headers=headers) for _ in range(4)]
        )
        assert {r.status_code for r in replies} == {202} and len({r.json()["id"] for r in replies}) == 1
        job = replies[0].json()
        assert job["status"] == "queued" and job["parent"] == {
            "job_id": parent["id"],
            "iteration": 1,
            "stage": "reflect",
        }
        assert job["request"]["prompt"] == SMALL["prompt"] and job["request"]["seed"] == trajectory["seed"]
        assert len(await store.r.keys(keys.steer("*"))) == 1  # the duplicates' records were dropped
        steer = json.loads(await store.r.get(keys.steer(job["id"])))
        assert steer["images"] == {"it1-draft": imagelib.storage_key(parent["id"], 1, "it1-draft")}
        # The steer record names the fork's own copy of the parent's trajectory (no JSON of it).
        assert steer["trajectory_key"] == f"{job['id']}/0/parent_trajectory.json"
        assert "trajectory" not in steer
        copies = sorted(settings.blob_dir.glob("*/0/parent_trajectory.json"))
        assert copies == [settings.blob_dir / steer["trajectory_key"]]  # the duplicates' went too
        assert copies[0].read_bytes() == encode_trajectory(trajectory)  # as the parent wrote it
        for _ in range(2):  # the fork and these two fill the queue (the finished parent is not in it)
            assert (await client.post("/v1/generations", json=SMALL)).status_code == 202
        full = await client.post(
            "/v1/generations", json={"fork": {"job_id": parent["id"], "instruction": "green"}}
        )
        assert full.status_code == 429 and error_of(full)["type"] == "queue_full"
        # The parent is not paused: continue is a 409; a queued job has no stages to fork yet.
        reply = await client.post(f"/v1/generations/{parent['id']}/continue", json={})
        assert reply.status_code == 409 and error_of(reply)["type"] == "not_ready"
        reply = await client.post(
            "/v1/generations", json={"fork": {"job_id": job["id"], "iteration": 1, "stage": "plan"}}
        )
        assert reply.status_code == 409 and error_of(reply)["param"] == "fork.job_id"


async def test_the_trajectory_is_read_through_the_job_hash_and_a_fork_keeps_its_own_copy(
    settings: Settings, store: Store, finished_run
):
    trajectory, images = finished_run
    blob_store = blobs.open_store(settings)
    async with AppClient(settings) as client:
        parent = (await client.post("/v1/generations", json=SMALL)).json()
        await _finish(store, parent["id"], trajectory, images)
        reply = await client.get(parent["links"]["trajectory"])
        assert reply.status_code == 200 and reply.content == encode_trajectory(trajectory)
        fork = {"fork": {"job_id": parent["id"], "iteration": 1, "stage": "reflect"}}
        child = (await client.post("/v1/generations", json=fork)).json()

        # The blob store does not answer: 503, as for images.
        class Away(LocalBlobs):
            async def get(self, key: str) -> bytes | None:
                raise blobs.BlobUnavailable("the store is away")

        client.app.state.blobs = Away(settings)
        reply = await client.get(parent["links"]["trajectory"])
        assert reply.status_code == 503 and error_of(reply)["type"] == "service_unavailable"
        client.app.state.blobs = blob_store

        # The parent's trajectory expires: its route and new forks of it say so ...
        await blob_store.delete(trajectory_key(parent["id"], 1))
        reply = await client.get(parent["links"]["trajectory"])
        assert reply.status_code == 404 and error_of(reply)["message"] == "the trajectory has expired"
        reply = await client.post("/v1/generations", json=fork)
        assert reply.status_code == 404 and error_of(reply)["param"] == "fork.job_id"
    # ... but the fork made before still runs from its own copy.
    message = JobMessage.from_json((await store.get_job(child["id"]))["request"])
    params = message.to_params(None, settings.max_side)
    steering = Steering(store.r, settings)
    params, options = await run_options(steering, blob_store, child["id"], message, params)
    assert params.seed == trajectory["seed"] and [s["stage"] for s in options.fork.stages] == [
        "plan",
        "draft",
        "reflect",
    ]
    assert options.fork.lineage["job_id"] == parent["id"]


@pytest.mark.parametrize("keep_inputs", [False, True], ids=["inputs-deleted", "inputs-kept"])
async def test_an_ended_edit_job_is_forked_only_where_its_input_is_kept(
    settings: Settings, store: Store, finished_run, keep_inputs: bool
):
    trajectory, images = finished_run
    edit = {**trajectory, "settings": {**trajectory["settings"], "starting_image": True}}
    settings = settings.model_copy(update={"blob_keep_inputs": keep_inputs})
    upload = "data:image/png;base64," + base64.b64encode(black_png(40, 24)).decode()
    fork = {"job_id": None, "iteration": 1, "stage": "reflect"}
    async with AppClient(settings) as client:
        parent = (await client.post("/v1/generations", json={**SMALL, "input_image": upload})).json()
        await _finish(store, parent["id"], edit, images)
        await blobs.open_store(settings).job_ended(parent["id"])  # as the worker's end of the job
        reply = await client.post("/v1/generations", json={"fork": {**fork, "job_id": parent["id"]}})
        if not keep_inputs:
            assert reply.status_code == 404 and error_of(reply)["param"] == "fork.job_id"
            assert "input image is gone" in error_of(reply)["message"]
            return
        assert reply.status_code == 202, reply.text
        child = reply.json()
        assert child["request"]["input_image"] is True
        parent_png = await client.get(parent["images"][0]["url"])
        child_png = await client.get(f"/v1/generations/{child['id']}/images/input")
        assert child_png.status_code == 200 and child_png.content == parent_png.content


async def test_the_api_ends_an_unanswered_pause_without_any_worker(settings: Settings, store: Store):
    """A pool scaled to zero: no worker's reclaim beat ends the pause; the API's sweep does."""
    settings = settings.model_copy(update={"pause_timeout_s": 1, "pause_sweep_interval_s": 0.05})
    async with AppClient(settings) as client:
        job = (await client.post("/v1/generations", json=SMALL)).json()
        await store.heartbeat("w-gone")
        entry_id, job_id = await store.poll("w-gone", 100)
        started = await store.start(job_id, entry_id, "w-gone")
        paused = Paused(1, Stage.plan, "a plan", {"seed": 1, "stages": [{"iteration": 1, "stage": "plan"}]})
        steering = Steering(store.r, settings)
        pause = await pause_of(steering, job["id"], started.attempt, paused)
        assert await steering.pause(job["id"], started.attempt, pause) == "paused"
        await store.drop_heartbeat("w-gone")  # the last worker leaves

        async def ended() -> dict:
            while (view := (await client.get(f"/v1/generations/{job['id']}")).json())["status"] == "paused":
                await asyncio.sleep(0.05)
            return view

        view = await asyncio.wait_for(ended(), timeout=30)
        assert view["status"] == "canceled" and view["error"]["type"] == "pause_expired"


# ---- steering inside admission and the budget ---------------------------------------------------


async def _pause(store: Store, settings: Settings, job_id: str, trajectory: dict) -> None:
    """What a worker does when `job_id` pauses after its first plan: its trajectory so far in the
    blob store, then the fenced pause (its entry acknowledged)."""
    await store.heartbeat("w-pause")
    entry_id, polled = await store.poll("w-pause", 100)
    assert polled == job_id
    started = await store.start(job_id, entry_id, "w-pause")
    so_far = {**trajectory, "stages": trajectory["stages"][:1]}
    await blobs.open_store(settings).put(trajectory_key(job_id, started.attempt), encode_trajectory(so_far))
    steering = Steering(store.r, settings)
    paused = Paused(1, Stage.plan, so_far["stages"][0]["text"], so_far)
    assert (
        await steering.pause(
            job_id, started.attempt, await pause_of(steering, job_id, started.attempt, paused)
        )
        == "paused"
    )


async def test_a_follow_up_is_priced_from_its_parents_recorded_context(
    settings: Settings, store: Store, finished_run
):
    trajectory, images = finished_run
    real = trajectory["stages"][-1]["positions"]  # what the worker recorded
    settings = settings.model_copy(update={"max_positions": 4000})
    async with AppClient(settings) as client:
        parent = (await client.post("/v1/generations", json=SMALL)).json()
        await _finish(store, parent["id"], trajectory, images)
        follow_up = {"fork": {"job_id": parent["id"], "instruction": "now make it green"}}
        assert (await client.post("/v1/generations", json=follow_up)).status_code == 202
        # The same parent, had its context been near the limit: the follow-up no longer fits.
        long = {
            **trajectory,
            "stages": [{**s, "positions": s["positions"] + 3500 - real} for s in trajectory["stages"]],
        }
        deep = (await client.post("/v1/generations", json=SMALL)).json()
        await _finish(store, deep["id"], long, images)
        reply = await client.post(
            "/v1/generations", json={"fork": {**follow_up["fork"], "job_id": deep["id"]}}
        )
        assert reply.status_code == 422 and error_of(reply)["type"] == "budget_exceeded"
        assert error_of(reply)["param"] == "max_positions" and "4,000" in error_of(reply)["message"]


async def test_continue_is_admitted_like_a_job_and_an_edit_is_priced(
    settings: Settings, store: Store, finished_run
):
    trajectory, _ = finished_run
    settings = settings.model_copy(
        update={"api_keys": [SecretStr("k")], "key_max_jobs": 1, "max_positions": 3000}
    )
    auth = {"Authorization": "Bearer k"}
    async with AppClient(settings) as client:
        job = (await client.post("/v1/generations", json=SMALL, headers=auth)).json()
        await _pause(store, settings, job["id"], trajectory)
        other = await client.post(
            "/v1/generations", json=SMALL, headers=auth
        )  # the paused job holds no place
        assert other.status_code == 202
        path = f"/v1/generations/{job['id']}/continue"
        reply = await client.post(path, json={}, headers=auth)
        assert reply.status_code == 429 and error_of(reply)["type"] == "quota_exceeded"
        assert "retry-after" in reply.headers
        await client.delete(f"/v1/generations/{other.json()['id']}", headers=auth)
        # A replacement text that makes the context too long is refused, the job stays paused.
        reply = await client.post(path, json={"text": "a much longer plan " * 200}, headers=auth)
        assert reply.status_code == 422 and error_of(reply)["param"] == "max_positions"
        assert (await client.get(f"/v1/generations/{job['id']}", headers=auth)).json()["status"] == "paused"
        reply = await client.post(path, json={"text": "<ins>a green cube</ins>"}, headers=auth)
        assert reply.status_code == 202 and reply.json()["status"] == "queued"
        steer = json.loads(await store.r.get(keys.steer(job["id"])))
        assert steer["point"]["text"] == "<ins>a green cube</ins>"
        reply = await client.post(path, json={}, headers=auth)
        assert reply.status_code == 409
        assert (
            error_of(reply)["message"] == "the job has been queued again; only a paused job can be continued"
        )
