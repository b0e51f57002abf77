"""The HTTP API's app: the factory, its lifespan, middleware and the routers it puts together.

The API holds no model and never imports torch: it validates, admits and enqueues jobs, and
serves their status, events and trajectories from Redis and their images from the blob store
(service/blobs/store.py; it also sweeps that store, one replica at a time). The routes are in
routes.py (a generation's life, the probes), generations.py (the list), openai_images.py,
steering_api.py, studio.py and docs_ui.py; errors become responses in errors.py alone.

`strokes api` runs this app under uvicorn and `strokes openapi` writes openapi.yaml from it
(service/cli/api.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strokes.service.api import docs_ui, errors, sse
from strokes.service.api.deps import bounded, get_settings
from strokes.service.api.metrics import ApiMetrics
from strokes.service.api.routes import events, generations, openai_images, probes, results, steering, studio
from strokes.service.blobs import links
from strokes.service.blobs import store as bloblib
from strokes.service.queue.client import TRANSIENT, connect
from strokes.service.queue.steering import Steering
from strokes.service.queue.store import Store
from strokes.service.shared.settings import Settings

log = logging.getLogger("strokes.api")

OPENAPI_PATH = Path(__file__).resolve().parents[2] / "openapi.yaml"


# ---- the query check ----------------------------------------------------------------------------


def reject_unknown_query(request: Request) -> None:
    """A query parameter the route does not read is a 422 naming it: a misspelt `?limt=` or
    `?statuss=` would otherwise be ignored without a word."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None or not request.url.path.startswith("/v1/"):  # the API, not the page's URLs
        return
    known = _query_names(dependant)
    for name in request.query_params:
        if name not in known:
            raise errors.InvalidRequest(f"unknown query parameter {name!r}", param=name or "query")


def _query_names(dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


# ---- middleware ---------------------------------------------------------------------------------


class BodyLimit:
    """413 for bodies over the limit: by Content-Length before reading, or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await errors.error_response(400, "bad_request", "invalid Content-Length")(
                    scope, receive, send
                )
            if int(length) > self.max_bytes:
                return await errors.error_response(
                    413,
                    "payload_too_large",
                    f"the body is larger than {self.max_bytes} bytes",
                    headers={"Connection": "close"},
                )(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, f"the body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Requests by route template and status, and time to the first byte of the response."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        begin = time.perf_counter()
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = scope.get("route")
                self.metrics.latency.labels(scope["method"], getattr(route, "path", "unmatched")).observe(
                    time.perf_counter() - begin
                )
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()


# ---- app ----------------------------------------------------------------------------------------


async def every(interval_s: float, chore: Callable[[], Awaitable[Any]], what: str) -> None:
    """`chore()` every `interval_s` until canceled (0: never). A failure (Redis or the blob store
    away) is logged and the chore tried again next interval."""
    if interval_s <= 0:
        return
    while True:
        try:
            await chore()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)
        await asyncio.sleep(interval_s)


async def end_expired_pauses(steering: Steering, blobs: bloblib.BlobStore) -> None:
    """The API's pause sweep: pauses left unanswered end, and their jobs' inputs with them."""
    for job_id in await steering.expire_pauses():
        await blobs.job_ended(job_id)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API app. `settings` (tests, `strokes api` flags) overrides the environment's."""
    settings = settings or get_settings()
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = connect(
            settings.redis_address,
            timeout_s=settings.redis_timeout_s,
            connect_timeout_s=settings.redis_connect_timeout_s,
        )
        blocking = connect(
            settings.redis_address,
            timeout_s=settings.sse_block_ms / 1000 + 5,
            connect_timeout_s=settings.redis_connect_timeout_s,
            max_connections=settings.sse_max_streams + 64,
        )
        app.state.store = Store(client, settings, blocking=blocking)
        app.state.steering = Steering(client, settings)
        app.state.blobs = bloblib.open_store(settings)
        app.state.hub = sse.EventHub(app.state.store, settings, links.event_links(app.state.blobs, settings))
        chores = [  # every replica runs them; the sweep takes a lock per interval, pauses end once
            asyncio.create_task(
                every(
                    settings.blob_sweep_interval_s,
                    lambda: bloblib.sweep_once(app.state.blobs, client, settings),
                    "blob sweep",
                )
            ),
            asyncio.create_task(
                every(
                    settings.pause_sweep_interval_s,
                    lambda: end_expired_pauses(app.state.steering, app.state.blobs),
                    "pause sweep",
                )
            ),
        ]
        try:
            await bounded(settings, app.state.store.ensure_group())
        except TRANSIENT as exc:  # not fatal: Redis may come up later
            log.warning("redis not reachable at startup: %s", exc)
        try:
            yield
        finally:
            for chore in chores:
                chore.cancel()
            await app.state.hub.close()
            await app.state.blobs.close()
            await app.state.store.close()

    app = FastAPI(
        title="strokes",
        version=_version(),
        summary="Process-driven image generation (plan, draft, reflect, refine) on BAGEL-7B-MoT",
        description="Submit a generation, follow its events over SSE, fetch its images and trajectory.",
        lifespan=lifespan,
        docs_url=None,  # docs_ui serves /docs and /redoc with local assets
        redoc_url=None,
        dependencies=[Depends(reject_unknown_query)],
    )
    app.state.metrics = metrics
    app.state.open_streams = 0
    app.dependency_overrides[get_settings] = lambda: settings
    errors.install(app)
    # The order of the routes is the order of the OpenAPI document's paths.
    app.include_router(generations.router)  # POST, GET (one, list), DELETE /v1/generations
    app.include_router(events.router)  # .../events (SSE)
    app.include_router(results.router)  # .../images/{image_id}, .../trajectory
    app.include_router(probes.router)  # /healthz, /readyz, /metrics
    docs_ui.install(app)
    app.include_router(openai_images.router)  # POST /v1/images/generations, /v1/images/edits
    studio.install(app)  # the page at /studio/, / redirecting there, GET /v1/info
    app.include_router(steering.router)  # POST /v1/generations/{id}/continue
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("strokes")
    except PackageNotFoundError:
        return "0+unknown"


def openapi_yaml(app: FastAPI | None = None) -> str:
    import yaml

    app = app or create_app(Settings())
    return yaml.safe_dump(app.openapi(), sort_keys=False, allow_unicode=True, width=100)
