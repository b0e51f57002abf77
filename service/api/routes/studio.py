"""The studio: a browser page, served by the API itself, to watch a generation as it happens.

`install(app)` adds, in one call from the app factory:

- `/studio/` the page's static files (service/api/studio/: index.html, *.js ES modules, studio.css; no
  build step, nothing loaded from the network, a Content-Security-Policy that says so);
- `/` a redirect to `/studio/` (the query string kept, so `/?job=gen_...` opens that job);
- `GET /v1/info` what the page needs before its first request: this server's defaults for a new
  generation (exactly what a request that leaves those fields out gets: service/api/defaults.py,
  STROKES_REQUEST_DEFAULTS), the limits of each field, whether an API key is required, the live
  workers' devices, and which optional routes this server has.

Workers say which device they run on once the model is loaded (Store.publish_worker: one field
of the hash keys.WORKER_INFO, worker name -> JSON {device, at}). /v1/info reports those whose
heartbeat is live and forgets entries of workers long gone (Store.worker_devices).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse
from pydantic import BaseModel
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from strokes.model.spec.params import MIN_SIDE, SIZE_MULTIPLE
from strokes.service.api.defaults import Defaults, defaults
from strokes.service.api.deps import SettingsDep, StoreDep, bounded
from strokes.service.api.schemas import GenerationRequest
from strokes.service.shared.messages import MAX_PROMPT_CHARS, DraftSettings
from strokes.service.shared.settings import Settings

log = logging.getLogger("strokes.studio")

STATIC_DIR = Path(__file__).resolve().parents[1] / "studio"
# Everything the page loads comes from this origin; images arrive as blob: URLs (fetched with the
# API key), and a dropped starting image is shown from a data: URL.
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; style-src 'self'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
STALE_WORKER_S = 300.0  # an info entry without a heartbeat for this long is deleted


class Limits(BaseModel):
    min_side: int
    max_side: int
    size_multiple: int
    max_iterations: int
    min_steps: int
    max_steps: int
    max_prompt_chars: int
    max_body_bytes: int


class WorkerInfo(BaseModel):
    name: str
    device: str


class Features(BaseModel):
    job_list: bool  # GET /v1/generations lists the caller's jobs
    steering: bool  # fork / pause_after / POST .../continue


class Info(BaseModel):
    defaults: Defaults
    limits: Limits
    auth_required: bool
    device: Literal["cuda", "cpu", "mixed", "none"]  # of the live workers
    workers: list[WorkerInfo]
    features: Features


def _bound(model: type[BaseModel], name: str, which: str) -> int:
    """A numeric bound (`ge`, `le`) declared on a request field: one source for the limits."""
    for meta in model.model_fields[name].metadata:
        value = getattr(meta, which, None)
        if value is not None:
            return int(value)
    raise LookupError(f"{model.__name__}.{name} declares no {which}")


def limits_for(settings: Settings) -> Limits:
    return Limits(
        min_side=MIN_SIDE,
        max_side=min(settings.max_side, _bound(GenerationRequest, "width", "le")),
        size_multiple=SIZE_MULTIPLE,
        max_iterations=_bound(GenerationRequest, "max_iterations", "le"),
        min_steps=_bound(DraftSettings, "steps", "ge"),
        max_steps=_bound(DraftSettings, "steps", "le"),
        max_prompt_chars=MAX_PROMPT_CHARS,
        max_body_bytes=settings.max_body_bytes,
    )


def features_of(app: FastAPI) -> Features:
    """Optional routes and fields, read from the app's own OpenAPI document (built once, cached),
    so routes other modules add are seen however they were included."""
    paths = app.openapi().get("paths", {})
    job_list = "get" in paths.get("/v1/generations", {})
    steering = "fork" in GenerationRequest.model_fields and "post" in paths.get(
        "/v1/generations/{job_id}/continue", {}
    )
    return Features(job_list=job_list, steering=steering)


def device_kind(workers: list[WorkerInfo]) -> str:
    kinds = {"cuda" if w.device.startswith("cuda") else "cpu" for w in workers}
    return "none" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"


router = APIRouter()


@router.get("/v1/info", response_model=Info, summary="Defaults, limits and workers, for the studio page")
async def info(request: Request, settings: SettingsDep, store: StoreDep) -> Info:
    # No API key needed: the page asks this before it has one. Errors map in errors.py (503).
    devices = await bounded(settings, store.worker_devices(STALE_WORKER_S))
    workers = [WorkerInfo(name=name, device=device) for name, device in sorted(devices.items())]
    device = device_kind(workers)
    return Info(
        defaults=defaults(settings.request_defaults),  # what a request that leaves them out gets
        limits=limits_for(settings),
        auth_required=bool(settings.api_keys),
        device=device,
        workers=workers,
        features=features_of(request.app),
    )


@router.get("/", include_in_schema=False)
async def root(request: Request) -> RedirectResponse:
    query = request.url.query
    return RedirectResponse("/studio/" + (f"?{query}" if query else ""), status_code=307)


class StudioFiles(StaticFiles):
    """The page's files, with headers that keep it self-contained and fresh after an upgrade."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-cache"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await super().__call__(scope, receive, with_headers)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/studio", StudioFiles(directory=STATIC_DIR, html=True), name="studio")
