"""The blob store: image bytes live here, Redis keeps only references to them.

Contract (both backends, one behaviour suite in tests/service/test_service_blobs.py):
- Keys are `{job_id}/{attempt}/{image_id}` (images.storage_key); `{job_id}/0/input` is the
  request's input image, everything else a worker's output or preview. A key outside that shape
  is refused (ValueError): keys become paths and object names.
- `put(key, data)` is atomic: a reader sees all of the bytes or none. The local backend writes a
  temp file (a dot name no key can take) and renames it; an S3 PUT is atomic by itself.
- `get(key)` -> bytes, or None when there is no such blob (expired, swept, never written).
- `delete(key)` is idempotent. `job_ended(job_id)` is the one call made where a job ends in any
  way (completed, failed, canceled, dead-lettered): it deletes the job's input unless
  `blob_keep_inputs`, and never raises (the sweep is the backstop).
- `sweep()` deletes by age: inputs older than `blob_input_ttl_s`, outputs and previews older than
  `blob_output_ttl_s`, and (local) temp files of a write that died half-way older than
  `blob_orphan_s`. So nothing leaks when a process dies mid-write or before `job_ended`.
  `sweep_forever` runs it every `blob_sweep_interval_s` in the API, one replica at a time (a
  Redis lock). An S3 lifecycle rule may do the same (deploy/README.md); nothing depends on it.
- `url(key)` -> a URL a client can GET without the API (S3 with `s3_presign`: a presigned URL
  valid `s3_presign_ttl_s`), or None (the API's own image route is the link).
- The store is unreachable or too slow (`blob_timeout_s`): `BlobUnavailable`, an OSError, so
  the worker's Redis-outage retry covers it too; the API answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from service import keys
from service.images import INPUT_IMAGE_ID, storage_key
from service.settings import Settings
from service.wire import image_url

log = logging.getLogger("strokes.blobs")
T = TypeVar("T")
KEY = re.compile(
    r"^(?P<job>[A-Za-z0-9_-]{1,64})/(?P<attempt>\d{1,6})/(?P<image>[A-Za-z0-9][A-Za-z0-9_.-]{0,127})$"
)


class BlobUnavailable(OSError):
    """The blob store did not answer (in time)."""


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def delete(self, key: str) -> None: ...

    async def sweep(self, now: float | None = None) -> int: ...

    def url(self, key: str) -> str | None: ...

    async def job_ended(self, job_id: str) -> None: ...

    async def close(self) -> None: ...


def check_key(key: str) -> re.Match:
    match = KEY.match(key)
    if match is None:
        raise ValueError(f"not a blob key: {key!r}")
    return match


def max_age(settings: Settings, key: str) -> float:
    """How long a blob of this key is kept (from its last write)."""
    match = check_key(key)
    if match["attempt"] == "0" and match["image"] == INPUT_IMAGE_ID:
        return settings.blob_input_ttl_s
    return settings.blob_output_ttl_s


class _Base:
    def __init__(self, settings: Settings):
        self.settings = settings

    async def _bounded(self, work: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(work, self.settings.blob_timeout_s)
        except asyncio.TimeoutError as exc:
            raise BlobUnavailable(
                f"the blob store did not answer in {self.settings.blob_timeout_s} s"
            ) from exc

    async def job_ended(self, job_id: str) -> None:
        if self.settings.blob_keep_inputs:
            return
        try:
            await self.delete(storage_key(job_id, 0, INPUT_IMAGE_ID))
        except (OSError, ValueError) as exc:  # the sweep removes it later
            log.warning("could not delete the input image of %s: %s", job_id, exc)

    def url(self, key: str) -> str | None:
        return None

    async def close(self) -> None:
        return None


# ---- a local directory --------------------------------------------------------------------------


class LocalBlobs(_Base):
    """Files under `blob_dir`/{job_id}/{attempt}/{image_id}: one directory shared by the API and
    the workers (a volume in compose)."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.root = Path(settings.blob_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root / key

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        for tries_left in (1, 0):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # the bytes are on disk before the name points at them
                os.replace(tmp, path)
                return
            except FileNotFoundError:  # the sweep removed the (old, empty) folder meanwhile
                if not tries_left:
                    raise
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def _get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def _delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    async def put(self, key: str, data: bytes) -> None:
        await self._bounded(asyncio.to_thread(self._put, key, data))

    async def get(self, key: str) -> bytes | None:
        return await self._bounded(asyncio.to_thread(self._get, key))

    async def delete(self, key: str) -> None:
        await self._bounded(asyncio.to_thread(self._delete, key))

    async def sweep(self, now: float | None = None) -> int:
        return await asyncio.to_thread(self._sweep, time.time() if now is None else now)

    def _sweep(self, now: float) -> int:
        removed = 0
        orphan_s = self.settings.blob_orphan_s
        for job_dir in _subdirs(self.root):
            for attempt_dir in _subdirs(job_dir):
                for entry in _entries(attempt_dir):
                    try:
                        age = now - entry.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if entry.name.startswith("."):
                        limit = float(orphan_s)  # a temp file: its writer died (or is slow beyond belief)
                    else:
                        try:
                            limit = max_age(self.settings, f"{job_dir.name}/{attempt_dir.name}/{entry.name}")
                        except ValueError:
                            continue  # not ours: leave it
                    if age > limit:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                            removed += 1
                _remove_if_old_and_empty(attempt_dir, now, orphan_s)
            _remove_if_old_and_empty(job_dir, now, orphan_s)
        return removed


def _subdirs(path: Path) -> list[Path]:
    return [Path(e.path) for e in _entries(path) if e.is_dir(follow_symlinks=False)]


def _entries(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []


def _remove_if_old_and_empty(path: Path, now: float, min_age_s: float) -> None:
    # Only folders untouched for a while: a fresh one may be about to receive a file (and a put
    # that loses the race anyway recreates it).
    try:
        if now - path.stat().st_mtime > min_age_s:
            path.rmdir()
    except OSError:  # not empty, or gone
        pass


# ---- S3-compatible object storage ---------------------------------------------------------------


class S3Blobs(_Base):
    """Objects `s3_prefix` + key in `s3_bucket`, through aiobotocore (AWS S3, MinIO, R2, GCS
    interoperability). Presigned URLs are signed locally (botocore), with `s3_public_endpoint_url`
    when clients reach the store under another name than the service does."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        if not settings.s3_bucket:
            raise ValueError("STROKES_S3_BUCKET is required with STROKES_BLOB_BACKEND=s3")
        self.bucket, self.prefix = settings.s3_bucket, settings.s3_prefix
        self._client: Any = None
        self._presigner: Any = None
        self._lock = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()

    def _client_args(self, endpoint: str | None) -> dict[str, Any]:
        from botocore.config import Config

        s = self.settings
        args: dict[str, Any] = {
            "region_name": s.s3_region or "us-east-1",
            "endpoint_url": endpoint or None,  # "" (an empty Secret key) means AWS too
            "config": Config(
                signature_version="s3v4",
                s3={"addressing_style": s.s3_addressing_style},
                connect_timeout=min(5.0, s.blob_timeout_s),
                read_timeout=s.blob_timeout_s,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        }
        key_id, secret = (
            v.get_secret_value() if v else "" for v in (s.s3_access_key_id, s.s3_secret_access_key)
        )
        if key_id and secret:  # else botocore's default chain: env, IRSA / instance role, files
            args["aws_access_key_id"], args["aws_secret_access_key"] = key_id, secret
        return args

    async def _c(self) -> Any:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    from aiobotocore.session import get_session

                    creating = get_session().create_client(
                        "s3", **self._client_args(self.settings.s3_endpoint_url)
                    )
                    self._client = await self._stack.enter_async_context(creating)
        return self._client

    async def _call(self, op: str, **params: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        client = await self._c()
        try:
            return await self._bounded(getattr(client, op)(Bucket=self.bucket, **params))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise KeyError(params.get("Key")) from exc
            raise BlobUnavailable(f"s3 {op}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise BlobUnavailable(f"s3 {op}: {exc}") from exc

    async def put(self, key: str, data: bytes) -> None:
        check_key(key)
        await self._call("put_object", Key=self.prefix + key, Body=data, ContentType="image/png")

    async def get(self, key: str) -> bytes | None:
        check_key(key)
        try:
            reply = await self._call("get_object", Key=self.prefix + key)
        except KeyError:
            return None
        async with reply["Body"] as body:
            return await self._bounded(body.read())

    async def delete(self, key: str) -> None:
        check_key(key)
        await self._call("delete_object", Key=self.prefix + key)

    async def sweep(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        client = await self._c()
        expired: list[str] = []
        async for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        ):
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) :]
                try:
                    limit = max_age(self.settings, key)
                except ValueError:
                    continue  # not ours: leave it
                if now - obj["LastModified"].timestamp() > limit:
                    expired.append(obj["Key"])
        for start in range(0, len(expired), 1000):
            batch = [{"Key": k} for k in expired[start : start + 1000]]
            await self._call("delete_objects", Delete={"Objects": batch, "Quiet": True})
        return len(expired)

    def url(self, key: str) -> str | None:
        if not self.settings.s3_presign:
            return None
        check_key(key)
        if self._presigner is None:
            import botocore.session

            s = self.settings
            endpoint = s.s3_public_endpoint_url or s.s3_endpoint_url
            self._presigner = botocore.session.get_session().create_client(
                "s3", **self._client_args(endpoint)
            )
        return self._presigner.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.prefix + key},
            ExpiresIn=self.settings.s3_presign_ttl_s,
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None


def open_store(settings: Settings) -> BlobStore:
    if settings.blob_backend == "s3":
        return S3Blobs(settings)
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


async def sweep_forever(blobs: BlobStore, redis: Any, settings: Settings) -> None:
    """`sweep_once` every `blob_sweep_interval_s` (the API runs this; 0 turns it off)."""
    if settings.blob_sweep_interval_s <= 0:
        return
    while True:
        try:
            await sweep_once(blobs, redis, settings)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis or the store away: try again next interval
            log.warning("blob sweep failed: %s", exc)
        await asyncio.sleep(settings.blob_sweep_interval_s)


# ---- links --------------------------------------------------------------------------------------


def presign_refs(value: Any, job_id: str, attempt_of: Callable[[str], int | None], blobs: BlobStore) -> Any:
    """Every image ref ({"id", "url": the API's image route, ...}) in a JSON value gets the
    store's direct URL instead, where the store has one and the image's attempt is known."""
    if isinstance(value, list):
        return [presign_refs(v, job_id, attempt_of, blobs) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: presign_refs(v, job_id, attempt_of, blobs) for k, v in value.items()}
    image_id = out.get("id")
    if isinstance(image_id, str) and out.get("url") == image_url(job_id, image_id):
        attempt = attempt_of(image_id)
        if attempt is not None:
            direct = blobs.url(storage_key(job_id, attempt, image_id))
            if direct is not None:
                out["url"] = direct
    return out


def event_links(blobs: BlobStore, settings: Settings) -> Callable[[Any], Any] | None:
    """For the SSE hub: an event (with .data JSON text and .attempt) with its image links presigned,
    or None when links stay the API's (no rewriting at all)."""
    if settings.blob_backend != "s3" or not settings.s3_presign:
        return None

    def rewrite(event: Any) -> Any:
        if '"url"' not in event.data:
            return event
        data = json.loads(event.data)
        job_id = data.get("job_id")
        if not isinstance(job_id, str):
            return event

        def attempt_of(image_id: str) -> int:
            return 0 if image_id == INPUT_IMAGE_ID else event.attempt

        return dataclasses.replace(event, data=json.dumps(presign_refs(data, job_id, attempt_of, blobs)))

    return rewrite
