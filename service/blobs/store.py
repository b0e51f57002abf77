"""The blob store: image bytes and trajectories live here, Redis keeps only references to them.

Contract (both backends, one behaviour suite in tests/service/blobs/test_store.py):
- Keys are `{job_id}/{attempt}/{name}`. `{job_id}/0/input` is the request's input image;
  `{job_id}/{attempt}/{image_id}` an attempt's image or preview (images.storage_key);
  `{job_id}/{attempt}/trajectory.json` an attempt's trajectory, rewritten at each stage end
  (wire.trajectory_key); `{job_id}/0/parent_trajectory.json` a fork's copy of its parent's
  trajectory (wire.parent_trajectory_key; image ids never take these two names). Everything but
  the input is kept as an output. A key outside that shape is refused (ValueError): keys become
  paths and object names.
- `put(key, data)` is atomic: a reader sees all of the bytes or none. The local backend writes a
  temp file (a dot name no key can take) and renames it; an S3 PUT is atomic by itself.
- `get(key)` -> bytes, or None when there is no such blob (expired, swept, never written).
- `delete(key)` is idempotent. `job_ended(job_id)` is the one call made where a job ends in any
  way (completed, failed, canceled, dead-lettered): it deletes the job's input unless
  `blob_keep_inputs`, and never raises (the sweep is the backstop). Outputs stay, trajectories
  included (a fork's copy of its parent's is needed until the fork has run, and is small).
- `sweep()` deletes by age (from the last write): inputs older than `blob_input_ttl_s`, outputs,
  previews and trajectories older than `blob_output_ttl_s`, and (local) temp files of a write
  that died half-way older than `blob_orphan_s`. So nothing leaks when a process dies mid-write
  or before `job_ended`.
  The API runs `sweep_once` every `blob_sweep_interval_s` (api.every), one replica at a time (a
  Redis lock). An S3 lifecycle rule may do the same (deploy/README.md); nothing depends on it.
- `url(key)` -> a URL a client can GET without the API (S3 with `s3_presign`: a presigned URL
  valid `s3_presign_ttl_s`), or None (the API's own image route is the link).
- Backends: `LocalBlobs` (local.py) and `S3Blobs` (s3.py, imported only when used).
- Failures are `BlobError`s, never OSErrors (an OSError is not Redis being away, and no
  Redis-outage handler may take one), in two kinds:
  `BlobUnavailable` (transient): unreachable, too slow (`blob_timeout_s` per call), overloaded,
  a server error. The store retries it itself, `blob_retries` times with a doubling backoff from
  `blob_retry_base_s`, and raises it once they are spent.
  `BlobRefused` (permanent): the store answers and refuses: a missing bucket, access denied, a
  full or read-only disk. Never retried: nothing changes until an operator acts. Its message says
  the cause in words. A worker fails the job at once (`storage_unavailable`) and lives on.
  The API answers 503 to either. Each store keeps its state (`health`: ok, unavailable or refused,
  from its last call; health.py) for /readyz and the metrics, and `check()` probes it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from strokes.service.blobs.health import BlobError, BlobHealth, BlobRefused, BlobUnavailable
from strokes.service.queue import keys
from strokes.service.shared.images import INPUT_IMAGE_ID, storage_key
from strokes.service.shared.settings import Settings
from strokes.service.shared.wire import BLOB_NAMES

log = logging.getLogger("strokes.blobs")
T = TypeVar("T")
__all__ = ["BlobError", "BlobRefused", "BlobStore", "BlobUnavailable", "open_store", "sweep_once"]
KEY = re.compile(
    r"^(?P<job>[A-Za-z0-9_-]{1,64})/(?P<attempt>\d{1,6})/(?P<image>[A-Za-z0-9][A-Za-z0-9_.-]{0,127})$"
)


class BlobStore(Protocol):
    health: BlobHealth

    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def delete(self, key: str) -> None: ...

    async def sweep(self, now: float | None = None) -> int: ...

    def url(self, key: str) -> str | None: ...

    async def job_ended(self, job_id: str) -> None: ...

    async def check(self) -> None: ...

    async def close(self) -> None: ...


def check_key(key: str) -> re.Match:
    match = KEY.match(key)
    if match is None:
        raise ValueError(f"not a blob key: {key!r}")
    return match


def content_type(key: str) -> str:
    """What a blob of this key holds: a trajectory (JSON) or an image (PNG)."""
    return "application/json" if check_key(key)["image"] in BLOB_NAMES else "image/png"


def max_age(settings: Settings, key: str) -> float:
    """How long a blob of this key is kept (from its last write)."""
    match = check_key(key)
    if match["attempt"] == "0" and match["image"] == INPUT_IMAGE_ID:
        return settings.blob_input_ttl_s
    return settings.blob_output_ttl_s


class BlobStoreBase:
    """What both backends share: each call bounded by `blob_timeout_s`, transient failures retried
    with a bounded backoff, the store's health kept, job_ended, no direct links."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.health = BlobHealth()

    async def _call(self, what: str, work: Callable[[], Awaitable[T]]) -> T:
        """`work()` (a fresh awaitable per try) within the timeout; BlobUnavailable retried
        `blob_retries` times (waiting blob_retry_base_s, then twice as long, ...), BlobRefused never."""
        s = self.settings
        delay = s.blob_retry_base_s
        for tries_left in range(s.blob_retries, -1, -1):
            try:
                result = await asyncio.wait_for(work(), s.blob_timeout_s)
            except asyncio.TimeoutError:
                error: BlobError = BlobUnavailable(f"{what}: no answer within {s.blob_timeout_s:g} s")
            except BlobError as exc:
                error = exc
            else:
                self.health.succeeded()
                return result
            self.health.failed(error)
            if isinstance(error, BlobRefused) or not tries_left:
                raise error
            log.warning("blob store unavailable, retrying in %.2f s: %s", delay, error.cause)
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def job_ended(self, job_id: str) -> None:
        if self.settings.blob_keep_inputs:
            return
        try:
            await self.delete(storage_key(job_id, 0, INPUT_IMAGE_ID))
        except (BlobError, ValueError) as exc:  # the sweep removes it later
            log.warning("could not delete the input image of %s: %s", job_id, exc)

    def url(self, key: str) -> str | None:
        return None

    async def close(self) -> None:
        return None


def open_store(settings: Settings) -> BlobStore:
    """The store the settings name: S3-compatible storage or a local directory."""
    if settings.blob_backend == "s3":
        from strokes.service.blobs.s3 import S3Blobs  # aiobotocore is imported only where S3 is used

        return S3Blobs(settings)
    from strokes.service.blobs.local import LocalBlobs

    return LocalBlobs(settings)


# ---- sweeping -----------------------------------------------------------------------------------


async def sweep_once(blobs: BlobStore, redis: Any, settings: Settings) -> int | None:
    """Sweep if no one else has this interval (a Redis lock held for the interval): the number of
    blobs removed, or None when another replica holds the lock."""
    interval_ms = max(1, int(settings.blob_sweep_interval_s * 1000))
    if not await redis.set(keys.BLOB_SWEEP_LOCK, secrets.token_hex(8), nx=True, px=interval_ms):
        return None
    began = time.monotonic()
    removed = await blobs.sweep()
    log.info("blob sweep", extra={"removed": removed, "seconds": round(time.monotonic() - began, 3)})
    return removed
