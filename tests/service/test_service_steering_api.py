"""Forks at the API, in-process (ASGI) against a real redis-server, without workers: a fork is an
ordinary job for admission (queue cap, 429) and idempotency, and takes its parent's request.

The parent is a real tiny-model run whose results are written where a worker writes them (job hash
status and image fields, images, trajectory), so the API sees a finished job."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from test_service_api import QUICK, _client, _error

from model.generation.events import ImageCompleted
from model.generation.loading import load_engine
from model.generation.params import GenerationParams, ImageSettings, TextSettings
from model.generation.pipeline import Pipeline
from service import blobs, keys
from service import images as imagelib
from service.settings import Settings
from service.store import Store


@pytest.fixture(scope="module")
def finished_run(tiny_checkpoint):
    torch.set_num_threads(1)
    engine = load_engine(tiny_checkpoint, device="cpu", dtype=torch.float32)
    text = TextSettings(max_tokens=4)
    params = GenerationParams(
        prompt=QUICK["prompt"],
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
    """What the worker's attempt 1 writes for a succeeded job."""
    fields = {"status": "succeeded", "attempt": "1"}
    blob_store = blobs.open_store(store.settings)
    for image_id, pixels in images.items():
        await blob_store.put(imagelib.storage_key(job_id, 1, image_id), imagelib.encode_png(pixels))
        fields[f"img:{image_id}"] = json.dumps({"id": image_id, "attempt": 1})
    await store.r.hset(keys.job(job_id), mapping=fields)
    await store.r.set(keys.trajectory(job_id), json.dumps(trajectory))


async def test_a_fork_is_admitted_like_any_job_and_takes_its_parents_request(
    settings: Settings, store: Store, finished_run
):
    trajectory, images = finished_run
    async with _client(settings.model_copy(update={"queue_cap": 3})) as client:
        parent = (await client.post("/v1/generations", json={**QUICK, "seed": None})).json()
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
        assert job["request"]["prompt"] == QUICK["prompt"] and job["request"]["seed"] == trajectory["seed"]
        assert len(await store.r.keys(keys.steer("*"))) == 1  # the duplicates' records were dropped
        steer = json.loads(await store.r.get(keys.steer(job["id"])))
        assert steer["images"] == {"it1-draft": imagelib.storage_key(parent["id"], 1, "it1-draft")}
        for _ in range(2):  # the fork and these two fill the queue (the finished parent is not in it)
            assert (await client.post("/v1/generations", json=QUICK)).status_code == 202
        full = await client.post(
            "/v1/generations", json={"fork": {"job_id": parent["id"], "instruction": "green"}}
        )
        assert full.status_code == 429 and _error(full)["type"] == "queue_full"
        # The parent is not paused: continue is a 409; a queued job has no stages to fork yet.
        reply = await client.post(f"/v1/generations/{parent['id']}/continue", json={})
        assert reply.status_code == 409 and _error(reply)["type"] == "not_ready"
        reply = await client.post(
            "/v1/generations", json={"fork": {"job_id": job["id"], "iteration": 1, "stage": "plan"}}
        )
        assert reply.status_code == 409 and _error(reply)["param"] == "fork.job_id"
