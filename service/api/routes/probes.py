"""The service's probes: liveness (/healthz), readiness (/readyz) and Prometheus metrics (/metrics).

/readyz probes Redis and the blob store (blobs.check(): S3's bucket, the local directory's room and
permissions) and reports the store's state; the replica is not ready while the store is refused
or unavailable (the reason says which, and why), or without a live worker when that is required.
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from strokes.service.api.deps import (
    BlobsDep,
    MetricsDep,
    SettingsDep,
    StoreDep,
    bounded,
)
from strokes.service.api.metrics import OutboxCollector
from strokes.service.api.schemas import BlobStoreState, Health, Readiness
from strokes.service.blobs.health import BlobError, BlobState, BlobStoreCollector
from strokes.service.queue.client import TRANSIENT, master_address, server_info
from strokes.service.queue.store import Store

log = logging.getLogger("strokes.api")

router = APIRouter()


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Readiness: Redis reachable, the blob store answering, and (by default) a live worker",
)
async def readyz(store: StoreDep, settings: SettingsDep, blobs: BlobsDep):
    try:
        workers, master, role = await bounded(settings, _ready_probe(store))
        redis_ok = True
    except TRANSIENT:
        workers, master, role, redis_ok = 0, None, None, False
    with contextlib.suppress(BlobError):  # the store's health records it
        await blobs.check()
    health = blobs.health
    reason = None
    if not redis_ok:
        reason = "redis unreachable"
    elif role != "master":
        reason = f"redis at {master} is a {role}: writes are refused"
    elif health.state != BlobState.ok:
        reason = f"blob store {health.state.value}: {health.cause}"
    elif settings.ready_requires_worker and workers == 0:
        reason = "no live worker"
    body = Readiness(
        status="ready" if reason is None else "not_ready",
        redis=redis_ok,
        workers=workers,
        blob_store=BlobStoreState(**health.describe()),
        reason=reason,
        redis_master=master,
    )
    return JSONResponse(body.model_dump(), status_code=200 if reason is None else 503)


async def _ready_probe(store: Store) -> tuple[int, str, str]:
    """(live workers, the master's address, the role that server says it has)."""
    role = str((await server_info(store.r, "replication")).get("role", "unknown"))
    return await store.count_live_workers(), await master_address(store.r), role


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics_endpoint(
    store: StoreDep, settings: SettingsDep, metrics: MetricsDep, blobs: BlobsDep
) -> Response:
    try:
        stats = await bounded(settings, store.queue_stats())
        metrics.queue_depth.set(stats.depth)
        metrics.queue_pending.set(stats.pending)
        metrics.workers_alive.set(stats.workers)
        if stats.lag is not None:
            metrics.queue_lag.set(stats.lag)
    except TRANSIENT as exc:
        log.warning("queue metrics unavailable: %s", exc)
    collectors: list = [BlobStoreCollector(blobs.health)]
    try:
        collectors.append(OutboxCollector(*await bounded(settings, store.outbox_stats())))
    except TRANSIENT as exc:
        log.warning("webhook outbox metrics unavailable: %s", exc)
    return Response(metrics.exposition(*collectors), media_type=CONTENT_TYPE_LATEST)
