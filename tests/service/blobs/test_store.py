"""The blob store's contract (service/blobs/store.py), ONE suite run against both backends: a local
directory, and S3 through a real S3-compatible HTTP server on loopback (moto's server mode).
No client call is patched. Plus the backend-specific parts: a write that died half-way (local),
presigned URLs and an unreachable endpoint (S3), the sweep lock, and the upload reduction; and the
store's errors of its own: refused (a missing bucket, a directory that cannot be written) at once,
unavailable retried inside the call, with the store's health and metrics."""

from __future__ import annotations

import asyncio
import base64
import errno
import io
import os
import secrets
import time
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
from PIL import Image
from prometheus_client import CollectorRegistry, generate_latest
from testkit.s3 import s3_settings

from strokes.model.spec.sizing import DEFAULT_MAX_PIXELS, resize_size
from strokes.service.api.app import every
from strokes.service.blobs import store as bloblib
from strokes.service.blobs.health import BlobState, BlobStoreCollector, classify_os_error
from strokes.service.blobs.local import LocalBlobs
from strokes.service.cli.serve import free_port
from strokes.service.queue import keys
from strokes.service.shared import images as imagelib
from strokes.service.shared.settings import Settings

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 1000
TRAJECTORY = b'{"version":2,"stages":[{"iteration":1,"stage":"plan","rng":"AAAA"}]}'


@pytest.fixture(params=["local", "s3"])
def blob_settings(request, settings: Settings) -> Settings:
    if request.param == "local":
        return settings
    return s3_settings(settings, request.getfixturevalue("s3_server"), f"t{secrets.token_hex(6)}/")


@pytest.fixture
async def blobs(blob_settings: Settings) -> AsyncIterator[bloblib.BlobStore]:
    store = bloblib.open_store(blob_settings)
    yield store
    await store.close()


# ---- the contract, both backends ----------------------------------------------------------------


async def test_put_get_delete_round_trip(blobs: bloblib.BlobStore):
    assert await blobs.get("gen_a/1/it1-draft") is None
    await blobs.put("gen_a/1/it1-draft", PNG)
    assert await blobs.get("gen_a/1/it1-draft") == PNG
    await blobs.put("gen_a/1/it1-draft", PNG + b"2")  # a retried write replaces the blob whole
    assert await blobs.get("gen_a/1/it1-draft") == PNG + b"2"
    assert await blobs.get("gen_a/2/it1-draft") is None  # attempts never share a blob
    await blobs.delete("gen_a/1/it1-draft")
    assert await blobs.get("gen_a/1/it1-draft") is None
    await blobs.delete("gen_a/1/it1-draft")  # idempotent


@pytest.mark.parametrize(
    "key", ["../etc/passwd", "gen_a/x/img", "gen_a/1/.hidden", "gen_a/1/a/b", "", "a//1"]
)
async def test_keys_outside_the_layout_are_refused(blobs: bloblib.BlobStore, key: str):
    with pytest.raises(ValueError):
        await blobs.put(key, PNG)
    with pytest.raises(ValueError):
        await blobs.get(key)


def test_image_ids_never_take_the_names_of_the_trajectory_blobs():
    from strokes.service.shared.wire import safe_image_id

    assert safe_image_id("trajectory.json") == "image-trajectory.json"
    assert safe_image_id("parent_trajectory.json") == "image-parent_trajectory.json"
    assert safe_image_id("it1-draft") == "it1-draft"
    assert bloblib.content_type("gen_a/1/trajectory.json") == "application/json"
    assert bloblib.content_type("gen_a/1/it1-draft") == "image/png"


async def test_job_end_deletes_the_input_and_keeps_the_outputs(blobs: bloblib.BlobStore):
    await blobs.put("gen_b/0/input", PNG)
    await blobs.put("gen_b/1/it1-refine", PNG)
    await blobs.put("gen_b/1/trajectory.json", TRAJECTORY)  # outputs too: the job's trajectory,
    await blobs.put("gen_b/0/parent_trajectory.json", TRAJECTORY)  # and a fork's copy of its parent's
    await blobs.job_ended("gen_b")
    assert await blobs.get("gen_b/0/input") is None
    assert await blobs.get("gen_b/1/it1-refine") == PNG
    assert await blobs.get("gen_b/1/trajectory.json") == TRAJECTORY
    assert await blobs.get("gen_b/0/parent_trajectory.json") == TRAJECTORY
    await blobs.job_ended("gen_b")  # again, or for a job without an input: nothing to do, no error
    await blobs.job_ended("gen_none")


async def test_inputs_are_retained_after_the_job_when_configured(blob_settings: Settings):
    store = bloblib.open_store(blob_settings.model_copy(update={"blob_keep_inputs": True}))
    try:
        await store.put("gen_c/0/input", PNG)
        await store.job_ended("gen_c")
        assert await store.get("gen_c/0/input") == PNG
        expired = time.time() + blob_settings.blob_input_ttl_s + 5
        assert await store.sweep(now=expired) >= 1  # still swept once past its TTL
        assert await store.get("gen_c/0/input") is None
    finally:
        await store.close()


async def test_sweep_removes_blobs_by_age_outputs_first_then_inputs(
    blobs: bloblib.BlobStore, blob_settings: Settings
):
    await blobs.put("gen_d/0/input", PNG)
    await blobs.put("gen_d/1/preview-1-draft-2", PNG)
    await blobs.put("gen_d/1/it1-draft", PNG)
    await blobs.put("gen_d/1/trajectory.json", TRAJECTORY)
    await blobs.put("gen_d/0/parent_trajectory.json", TRAJECTORY)
    now = time.time()
    assert await blobs.sweep(now=now) == 0  # everything is fresh
    assert await blobs.sweep(now=now + blob_settings.blob_output_ttl_s + 5) == 4
    assert await blobs.get("gen_d/1/it1-draft") is None
    assert await blobs.get("gen_d/1/preview-1-draft-2") is None
    assert await blobs.get("gen_d/1/trajectory.json") is None
    assert await blobs.get("gen_d/0/parent_trajectory.json") is None
    assert await blobs.get("gen_d/0/input") == PNG  # inputs live longer (a job may wait in the queue)
    assert await blobs.sweep(now=now + blob_settings.blob_input_ttl_s + 5) == 1
    assert await blobs.get("gen_d/0/input") is None


async def test_concurrent_writers_and_readers_never_see_a_partial_blob(blobs: bloblib.BlobStore):
    big = [bytes([i]) * 300_000 for i in range(1, 6)]

    async def write():
        for data in big:
            await blobs.put("gen_e/1/it1-draft", data)

    async def read() -> set[bytes]:
        seen = set()
        for _ in range(20):
            got = await blobs.get("gen_e/1/it1-draft")
            if got is not None:
                assert got in big, "a reader saw a partial or mixed blob"
                seen.add(got[:1])
        return seen

    await asyncio.gather(write(), read(), read())
    assert await blobs.get("gen_e/1/it1-draft") == big[-1]


# ---- local directory ----------------------------------------------------------------------------


async def test_local_write_that_died_half_way_is_invisible_and_swept(settings: Settings):
    store = LocalBlobs(settings)
    await store.put("gen_f/1/it1-draft", PNG)
    folder = settings.blob_dir / "gen_f" / "1"
    # What a worker killed mid-write leaves: a temp file next to where the blob would go.
    dead = folder / ".it1-refine.0123456789ab.tmp"
    dead.write_bytes(PNG[:10])
    assert await store.get("gen_f/1/it1-refine") is None
    now = time.time()
    assert await store.sweep(now=now + 10) == 0  # a write in progress is left alone
    assert dead.exists()
    assert await store.sweep(now=now + settings.blob_orphan_s + 5) == 1
    assert not dead.exists() and await store.get("gen_f/1/it1-draft") == PNG
    # Empty folders go too, once they have stayed empty for a while (a fresh one may be about to
    # receive a file).
    fresh = settings.blob_dir / "gen_j" / "1"
    fresh.mkdir(parents=True)
    await store.sweep(now=time.time())
    assert fresh.exists()
    await store.sweep(now=now + settings.blob_output_ttl_s + 5)
    assert not (settings.blob_dir / "gen_f").exists() and not (settings.blob_dir / "gen_j").exists()
    assert os.listdir(settings.blob_dir) == []
    assert store.url("gen_f/1/it1-draft") is None  # links stay the API's


# ---- S3 -----------------------------------------------------------------------------------------


async def test_s3_presigned_url_serves_the_bytes_without_credentials(settings: Settings, s3_server: str):
    plain = s3_settings(settings, s3_server, f"t{secrets.token_hex(6)}/")
    store = bloblib.open_store(plain.model_copy(update={"s3_presign": True, "s3_presign_ttl_s": 60}))
    try:
        await store.put("gen_g/1/it1-refine", PNG)
        url = store.url("gen_g/1/it1-refine")
        assert url is not None and url.startswith(s3_server) and "X-Amz-Signature=" in url
        async with httpx.AsyncClient() as http:
            reply = await http.get(url)
            assert reply.status_code == 200 and reply.content == PNG
            assert reply.headers["content-type"] == "image/png"
            unsigned = await http.get(url.split("?")[0])
            assert unsigned.status_code == 403
            await store.put("gen_g/1/trajectory.json", TRAJECTORY)  # stored as what it is
            reply = await http.get(store.url("gen_g/1/trajectory.json"))
            assert reply.content == TRAJECTORY and reply.headers["content-type"] == "application/json"
        assert bloblib.open_store(plain).url("gen_g/1/it1-refine") is None  # presigning is opt-in
    finally:
        await store.close()


async def test_s3_presigned_url_uses_the_public_endpoint(settings: Settings, s3_server: str):
    s = s3_settings(
        settings, s3_server, "p/", s3_presign=True, s3_public_endpoint_url="https://images.example.com"
    )
    url = bloblib.open_store(s).url("gen_h/1/it1-refine")
    assert url.startswith("https://images.example.com/strokes-test/p/gen_h/1/it1-refine?")


async def test_s3_unreachable_is_blob_unavailable_within_the_timeout(settings: Settings):
    dead = s3_settings(settings, f"http://127.0.0.1:{free_port()}", "x/", blob_timeout_s=2.0)
    store = bloblib.open_store(dead)
    try:
        began = time.monotonic()
        with pytest.raises(bloblib.BlobUnavailable):
            await store.get("gen_i/1/it1-refine")
        assert time.monotonic() - began < 5  # three tries, 0.25 + 0.5 s apart
        assert store.health.errors[BlobState.unavailable] == 3 and store.health.state == "unavailable"
        with pytest.raises(bloblib.BlobError) as raised:
            await store.put("gen_i/1/it1-refine", PNG)
        assert not isinstance(raised.value, OSError)  # never taken for Redis being away
    finally:
        await store.close()


# ---- errors of their own: refused (permanent) vs unavailable (transient, retried) ----------------


async def test_s3_missing_bucket_is_refused_at_once_with_its_cause_in_words(
    settings: Settings, s3_server: str
):
    missing = s3_settings(settings, s3_server, "m/", s3_bucket="no-such-bucket", blob_retries=5)
    store = bloblib.open_store(missing)
    try:
        began = time.monotonic()
        with pytest.raises(bloblib.BlobRefused, match="the bucket no-such-bucket does not exist"):
            await store.put("gen_m/1/it1-draft", PNG)
        assert time.monotonic() - began < 2  # not retried: nothing changes until an operator acts
        assert store.health.errors == {BlobState.unavailable: 0, BlobState.refused: 1}
        with pytest.raises(bloblib.BlobRefused, match="does not exist"):
            await store.check()  # what /readyz probes
        assert store.health.describe()["state"] == "refused"
    finally:
        await store.close()
    good = bloblib.open_store(s3_settings(settings, s3_server, "m/"))
    try:
        await good.check()
        assert good.health.state == BlobState.ok
    finally:
        await good.close()


async def test_local_directory_that_cannot_be_written_is_refused(settings: Settings, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the blob directory's parent should be")
    store = LocalBlobs(settings.model_copy(update={"blob_dir": blocker / "blobs"}))
    assert store.health.state == BlobState.refused  # seen at start already
    with pytest.raises(bloblib.BlobRefused, match="not a directory"):
        await store.put("gen_n/1/it1-draft", PNG)
    with pytest.raises(bloblib.BlobRefused):
        await store.check()
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        store = LocalBlobs(settings.model_copy(update={"blob_dir": locked}))
        with pytest.raises(bloblib.BlobRefused, match="permission denied"):
            await store.put("gen_n/1/it1-draft", PNG)


def test_file_system_errors_are_classified_by_what_retrying_can_mend():
    full = classify_os_error(OSError(errno.ENOSPC, "No space left on device", "/blobs/x"), "local put")
    assert isinstance(full, bloblib.BlobRefused) and full.cause == "local put: the disk is full (/blobs/x)"
    for code in (errno.EACCES, errno.EROFS, errno.EDQUOT):
        assert isinstance(classify_os_error(OSError(code, "x"), "local put"), bloblib.BlobRefused)
    flaky = classify_os_error(OSError(errno.EIO, "Input/output error"), "local get")
    assert isinstance(flaky, bloblib.BlobUnavailable) and not isinstance(flaky, OSError)


class FlakyDisk(LocalBlobs):
    """The local store on a disk whose reads fail with EIO `failures` times, then work."""

    def __init__(self, settings: Settings, failures: int):
        super().__init__(settings)
        self.failures = failures

    def _get(self, key: str) -> bytes | None:
        if self.failures > 0:
            self.failures -= 1
            raise OSError(errno.EIO, "Input/output error")
        return super()._get(key)


async def test_a_transient_error_is_retried_inside_the_call_with_a_bounded_backoff(settings: Settings):
    store = FlakyDisk(settings.model_copy(update={"blob_retries": 2, "blob_retry_base_s": 0.01}), 2)
    await store.put("gen_o/1/it1-draft", PNG)
    assert await store.get("gen_o/1/it1-draft") == PNG  # two failures, then the third try
    assert store.health.state == BlobState.ok and store.health.errors[BlobState.unavailable] == 2
    store.failures = 3  # more than the retries: the call fails, transient
    with pytest.raises(bloblib.BlobUnavailable, match="Input/output error"):
        await store.get("gen_o/1/it1-draft")
    assert store.health.state == BlobState.unavailable
    exposition = generate_latest(_registry(store)).decode()
    assert "strokes_blob_store_up 0.0" in exposition
    assert 'strokes_blob_store_state{state="unavailable"} 1.0' in exposition
    assert 'strokes_blob_store_errors_total{kind="unavailable"} 5.0' in exposition


def _registry(store) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(BlobStoreCollector(store.health))
    return registry


def test_s3_needs_a_bucket(settings: Settings):
    with pytest.raises(ValueError, match="STROKES_S3_BUCKET"):
        bloblib.open_store(settings.model_copy(update={"blob_backend": "s3", "s3_bucket": ""}))


# ---- sweeping in the API ------------------------------------------------------------------------


async def test_one_sweeper_per_interval_across_replicas(settings: Settings):
    s = settings.model_copy(update={"blob_sweep_interval_s": 60.0})
    store = LocalBlobs(s)
    await store.put("gen_k/1/it1-draft", PNG)
    os.utime(s.blob_dir / "gen_k/1/it1-draft", (1, 1))  # written long ago
    client = aioredis.Redis.from_url(s.redis_url)
    try:
        assert await bloblib.sweep_once(store, client, s) == 1
        assert 50_000 < await client.pttl(keys.BLOB_SWEEP_LOCK) <= 60_000
        assert await bloblib.sweep_once(store, client, s) is None  # another replica: skips
        await client.delete(keys.BLOB_SWEEP_LOCK)  # the interval is over
        assert await bloblib.sweep_once(store, client, s) == 0
        off = s.model_copy(update={"blob_sweep_interval_s": 0.0})
        sweep = lambda: bloblib.sweep_once(store, client, off)  # noqa: E731
        await asyncio.wait_for(every(off.blob_sweep_interval_s, sweep, "blob sweep"), 1)  # 0: returns at once
    finally:
        await client.aclose()


# ---- uploads are stored at the size the model uses ----------------------------------------------


def _upload(width: int, height: int, mode: str = "RGB") -> str:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (height, width, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, format="PNG", compress_level=1)
    return base64.b64encode(out.getvalue()).decode()


def test_a_4096_upload_is_stored_at_what_the_model_uses():
    big_png, w, h = imagelib.decode_upload(_upload(4096, 4096), 4096 * 4096, Settings().upload_resize)
    assert (w, h) == (1024, 1024) == resize_size(4096, 4096, 1024, 512, 16, DEFAULT_MAX_PIXELS)
    small_png, _, _ = imagelib.decode_upload(_upload(1024, 1024), 4096 * 4096, Settings().upload_resize)
    assert len(big_png) < 1.2 * len(small_png)  # costs what a 1024^2 upload does
    # A size the model would enlarge is stored as it came (enlarging would only cost more).
    _, w, h = imagelib.decode_upload(_upload(300, 200), 4096 * 4096, Settings().upload_resize)
    assert (w, h) == (300, 200)


def test_the_model_gets_the_same_pixels_from_the_reduced_upload():
    """What the engine feeds BAGEL from the stored image equals what it feeds from the original."""
    from strokes.model.network.transforms import VAE_TRANSFORM
    from strokes.model.spec.sizing import to_rgb

    raw = base64.b64decode(_upload(1500, 900, "RGBA"))
    stored, w, h = imagelib.decode_upload(
        base64.b64encode(raw).decode(), 4096 * 4096, Settings().upload_resize
    )
    assert (w, h) == VAE_TRANSFORM.size(1500, 900)
    from_original = VAE_TRANSFORM.resize(to_rgb(Image.open(io.BytesIO(raw))))
    from_stored = VAE_TRANSFORM.resize(to_rgb(Image.open(io.BytesIO(stored))))
    assert np.array_equal(np.asarray(from_original), np.asarray(from_stored))


# ---- the job's end deletes its input, however it ends (in-process worker, both backends) ---------


@pytest.mark.parametrize("ending", ["succeeded", "failed", "canceled", "dead_lettered"])
async def test_input_goes_when_the_job_ends_in_any_way(blob_settings: Settings, ending: str):
    from testkit.pipelines import ScriptedPipeline
    from testkit.workers import in_process_worker

    from strokes.service.queue.client import connect
    from strokes.service.queue.store import Store
    from strokes.service.shared.messages import JobMessage

    s = blob_settings.model_copy(
        update={
            "heartbeat_interval_s": 0.2,
            "lease_ttl_s": 1.0,
            "reclaim_interval_s": 0.1,
            "poll_block_ms": 100,
        }
    )
    s = s.model_copy(update={"max_attempts": 2})
    store = Store(connect(s.redis_url, timeout_s=5, connect_timeout_s=1), s)
    await store.ensure_group()
    blobs = bloblib.open_store(s)
    job_id = f"gen_{ending}"
    png, _, _ = imagelib.decode_upload(_upload(48, 32), s.max_input_pixels, s.upload_resize)
    await blobs.put(f"{job_id}/0/input", png)
    message = JobMessage(prompt="a cube", width=32, height=32, max_iterations=1, input_image=True)
    assert (
        await store.enqueue(job_id, owner="", message=message, body_hash="h", idempotency_key=None)
    ).outcome == "ok"
    if ending == "dead_lettered":  # its worker died on every attempt: the next start dead-letters it
        await store.r.hset(keys.job(job_id), mapping={"status": "running", "failures": "2"})
    pipeline = ScriptedPipeline(
        steps=200 if ending == "canceled" else 2, step_s=0.02, fail=ending == "failed"
    )
    worker = in_process_worker(store.r, s, "w1", pipeline, blobs=blobs)
    task = asyncio.create_task(worker.run())
    try:
        if ending == "canceled":
            await _until(lambda: _has_event(store, job_id, "image.progress"))
            assert (await store.cancel(job_id))[0] == "canceling"

        async def ended() -> str | None:
            status = (await store.get_job(job_id))["status"]
            return status if status in ("succeeded", "failed", "canceled") else None

        expected = {"dead_lettered": "failed"}.get(ending, ending)
        assert await _until(ended, timeout=20) == expected
        await _until(lambda: _gone(blobs, f"{job_id}/0/input"))  # job_ended runs right after the end
        if ending == "succeeded":
            assert await blobs.get(f"{job_id}/1/it1-refine") is not None  # outputs stay
        if ending == "dead_lettered":
            assert pipeline.runs == 0 and [d["job_id"] for d in await store.dead_letters()] == [job_id]
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 10)
        await blobs.close()
        await store.close()


async def _has_event(store, job_id: str, name: str) -> bool:
    return any(e.name == name for e in await store.read_events(job_id))


async def _gone(blobs: bloblib.BlobStore, key: str) -> bool:
    return await blobs.get(key) is None


async def _until(probe, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def test_input_goes_when_a_pause_expires_whoever_ends_it(blob_settings: Settings):
    """The API's sweep and a worker's reclaim beat both end expired pauses: the inputs go too."""
    from testkit.pipelines import ScriptedPipeline
    from testkit.workers import in_process_worker

    from strokes.model.spec.events import Paused, Stage
    from strokes.service.api.app import end_expired_pauses
    from strokes.service.queue.client import connect
    from strokes.service.queue.steering import Steering
    from strokes.service.queue.store import Store
    from strokes.service.shared.messages import JobMessage
    from strokes.service.worker.steering import pause_of

    s = blob_settings.model_copy(update={"reclaim_interval_s": 0.0})
    store = Store(connect(s.redis_url, timeout_s=5, connect_timeout_s=1), s)
    await store.ensure_group()
    steering = Steering(store.r, s)
    blobs = bloblib.open_store(s)
    try:
        for job_id in ("gen_api_sweep", "gen_worker_beat"):
            await blobs.put(f"{job_id}/0/input", PNG)
            message = JobMessage(prompt="a cube", width=32, height=32, max_iterations=1, input_image=True)
            enqueued = await store.enqueue(
                job_id, owner="", message=message, body_hash="h", idempotency_key=None
            )
            assert enqueued.outcome == "ok"
            await store.heartbeat("w-pauses")
            entry_id, polled = await store.poll("w-pauses", 100)
            started = await store.start(polled, entry_id, "w-pauses")
            paused = Paused(
                1, Stage.plan, "a plan", {"seed": 1, "stages": [{"iteration": 1, "stage": "plan"}]}
            )
            pause = await pause_of(steering, job_id, started.attempt, paused)
            assert await steering.pause(job_id, started.attempt, pause) == "paused"
            await store.r.zadd(keys.PAUSED, {job_id: 1})  # its pause is long past due
            if job_id == "gen_api_sweep":
                await end_expired_pauses(steering, blobs)
            else:
                worker = in_process_worker(store.r, s, "w-beat", ScriptedPipeline(), blobs=blobs)
                await worker.reclaim()
                worker.runner.close()
            assert (await store.get_job(job_id))["status"] == "canceled"
            assert await blobs.get(f"{job_id}/0/input") is None
    finally:
        await blobs.close()
        await store.close()
