"""In-process workers for the worker's tests, built by the worker's own factory
(service/worker/main.py build_worker) on the test's Redis client, with a scripted pipeline."""

from __future__ import annotations

import redis.asyncio as aioredis

from strokes.service.blobs.store import BlobStore, open_store
from strokes.service.shared.settings import Settings
from strokes.service.worker.loop import Worker, torch_thread
from strokes.service.worker.main import build_worker
from strokes.service.worker.metrics import WorkerMetrics
from strokes.service.worker.runner import Pipeline


def in_process_worker(
    client: aioredis.Redis,
    settings: Settings,
    name: str,
    pipeline: Pipeline,
    *,
    blobs: BlobStore | None = None,
    metrics: WorkerMetrics | None = None,
) -> Worker:
    """A worker as `strokes worker` builds one: `blobs` default to the settings' store, the
    pipeline runs on its own torch thread."""
    return build_worker(
        settings,
        client,
        pipeline,
        name,
        metrics or WorkerMetrics(),
        blobs or open_store(settings),
        torch_thread(),
    )
