"""End to end with each blob store: the real API and worker processes, the tiny model, a real
redis-server, and (for S3) moto's real S3 HTTP server on loopback. A job's upload, previews and
images round-trip through the API; the upload goes when its job ends (completed or canceled);
presigned links (S3) reach the store directly and only the owner sees them; the trajectory is a
blob too; and afterwards Redis holds no image bytes and no trajectory at all, only references."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from testkit.jobs import QUICK, payload, stream_events, submit
from testkit.processes import start_api, start_worker, wait_for, wait_workers
from testkit.redis_contents import redis_holds_references_only
from testkit.s3 import s3_env

from strokes.service.blobs import store as bloblib
from strokes.service.shared.settings import Settings

pytestmark = pytest.mark.slow

OWNER = {"Authorization": "Bearer key-one"}
OTHER = {"Authorization": "Bearer key-two"}


def _upload(width: int, height: int) -> str:
    pixels = np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _refs(value) -> list[dict]:
    """Every image ref ({"id", "url", ...}) anywhere in a JSON value."""
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    if not isinstance(value, dict):
        return []
    own = [value] if {"id", "url", "width", "height"} <= set(value) else []
    return own + [r for v in value.values() for r in _refs(v)]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_upload_previews_and_images_round_trip_and_redis_keeps_no_pixels(
    backend, request, redis_server, tiny_checkpoint, tmp_path: Path, procs
):
    server = type(redis_server)(tmp_path / "redis")
    server.start()
    request.addfinalizer(server.stop)
    blob_env: dict[str, object] = {"blob_dir": tmp_path / "blobs", "api_keys": "key-one,key-two"}
    if backend == "s3":
        endpoint = request.getfixturevalue("s3_server")
        blob_env |= {**s3_env(endpoint, f"e2e-{secrets.token_hex(4)}/"), "s3_presign": "true"}
    api, base = start_api(server.url, tmp_path, **blob_env)
    procs.append(api)

    # Two jobs with a 2048x1536 upload, before any worker runs: both inputs are stored, reduced.
    body = {**QUICK, "preview_every": 2, "input_image": _upload(2048, 1536)}
    job = submit(base, body, OWNER)
    dropped = submit(base, body, OWNER)
    (input_ref,) = [r for r in job["images"] if r["id"] == "input"]
    assert (input_ref["width"], input_ref["height"]) == (1024, 768)  # BAGEL's input resize
    got = httpx.get(f"{base}/v1/generations/{job['id']}/images/input", headers=OWNER, timeout=10)
    assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (1024, 768)
    if backend == "s3":  # the owner's views carry presigned links straight to the store
        assert input_ref["url"].startswith(endpoint)
        direct = httpx.get(input_ref["url"], timeout=10)
        assert direct.status_code == 200 and direct.content == got.content

    # Another key sees nothing: no status (so no links), no events, no image.
    for path in ("", "/events", "/images/input"):
        assert (
            httpx.get(f"{base}/v1/generations/{job['id']}{path}", headers=OTHER, timeout=5).status_code == 404
        )

    # Canceling a queued job deletes its upload at once.
    assert httpx.delete(f"{base}/v1/generations/{dropped['id']}", headers=OWNER, timeout=5).status_code == 200
    gone = httpx.get(f"{base}/v1/generations/{dropped['id']}/images/input", headers=OWNER, timeout=5)
    assert gone.status_code == 404 and gone.json()["error"]["message"] == "the image has expired"

    worker = start_worker(server.url, tiny_checkpoint, tmp_path, "w1", **blob_env)
    procs.append(worker)
    wait_workers(server.url, {"w1": worker})
    events = stream_events(base, job["id"], headers=OWNER)
    assert events[-1].name == "job.completed"

    refs = [r for e in events for r in _refs(payload(e))]
    previews = [r for r in refs if r["id"].startswith("preview-")]
    assert previews and any(r["id"] == payload(events[-1])["final_image"]["id"] for r in refs)
    status = httpx.get(f"{base}/v1/generations/{job['id']}", headers=OWNER, timeout=5).json()
    outputs = [r for r in _refs(status) if r["id"] != "input"]
    for ref in {r["id"]: r for r in refs + outputs}.values():
        reply = httpx.get(f"{base}/v1/generations/{job['id']}/images/{ref['id']}", headers=OWNER, timeout=10)
        assert reply.status_code == 200, ref
        image = Image.open(io.BytesIO(reply.content))
        assert image.format == "PNG" and image.size == (ref["width"], ref["height"])
        if backend == "s3":  # by presigned URL, bypassing the API: the same bytes
            assert ref["url"].startswith(endpoint) and "X-Amz-Signature=" in ref["url"]
            assert httpx.get(ref["url"], timeout=10).content == reply.content
        else:
            assert ref["url"] == f"/v1/generations/{job['id']}/images/{ref['id']}"

    # The upload goes with the job's end (the worker deletes it right after the terminal write, so
    # a client reading job.completed may still fetch it for a moment); the outputs stay.
    input_url = f"{base}/v1/generations/{job['id']}/images/input"
    wait_for(
        lambda: httpx.get(input_url, headers=OWNER, timeout=5).status_code == 404,
        timeout=30,
        what="the ended job's input to be deleted",
    )
    settings = Settings(redis_url=server.url, **blob_env)

    async def in_store() -> tuple[bytes | None, ...]:
        store = bloblib.open_store(settings)
        try:
            final = status["final_image"]["id"]
            return (
                await store.get(f"{job['id']}/0/input"),
                await store.get(f"{dropped['id']}/0/input"),
                await store.get(f"{job['id']}/1/{final}"),
                await store.get(f"{job['id']}/1/trajectory.json"),
            )
        finally:
            await store.close()

    kept_input, dropped_input, final_png, trajectory = asyncio.run(in_store())
    assert kept_input is None and dropped_input is None and final_png is not None
    # The trajectory (with the generator's state at every stage) is the attempt's blob, served
    # through the API; the job hash names it.
    reply = httpx.get(f"{base}/v1/generations/{job['id']}/trajectory", headers=OWNER, timeout=10)
    assert reply.status_code == 200 and reply.content == trajectory
    assert all("rng" in stage for stage in json.loads(trajectory)["stages"])
    redis_holds_references_only(server.url)
