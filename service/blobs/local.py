"""The local-directory backend of the blob store (service/blobs/store.py has the contract).

A file system error becomes a BlobError (health.classify_os_error): a full, read-only or
forbidden directory is refused (permanent), anything else unavailable (transient, retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from strokes.service.blobs.health import BlobRefused, classify_os_error
from strokes.service.blobs.store import BlobStoreBase, check_key, max_age
from strokes.service.shared.settings import Settings

T = TypeVar("T")


class LocalBlobs(BlobStoreBase):
    """Files under `blob_dir`/{job_id}/{attempt}/{image_id}: one directory shared by the API and
    the workers (a volume in compose)."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.root = Path(settings.blob_dir)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # the store reports it on its first call (and /readyz shows it)
            self.health.failed(classify_os_error(exc, "local blob directory"))

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

    async def _io(self, what: str, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` on a thread, its OSError as a BlobError."""
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as exc:
            raise classify_os_error(exc, f"local {what}") from exc

    async def put(self, key: str, data: bytes) -> None:
        await self._call("put", lambda: self._io("put", self._put, key, data))

    async def get(self, key: str) -> bytes | None:
        return await self._call("get", lambda: self._io("get", self._get, key))

    async def delete(self, key: str) -> None:
        await self._call("delete", lambda: self._io("delete", self._delete, key))

    async def check(self) -> None:
        await self._call("check", lambda: self._io("check", self._check))

    def _check(self) -> None:
        """The directory exists (made if need be), may be written, and has room."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise BlobRefused(f"local check: permission denied ({self.root})")
        stat = os.statvfs(self.root)
        if stat.f_bavail == 0 or (stat.f_favail == 0 and stat.f_files > 0):
            raise BlobRefused(f"local check: the disk is full ({self.root})")

    async def sweep(self, now: float | None = None) -> int:
        return await self._io("sweep", self._sweep, time.time() if now is None else now)

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
