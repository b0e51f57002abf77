"""What the API's routes share: dependencies on the app's state (its Store, blob store and
metrics), the deadline on a request's Redis work, and the error responses of the document.

The state is built by the app's lifespan (service/api/app.py); the routes name it through the
`Annotated` aliases below (`store: StoreDep`, `steering: SteeringDep`), as they name the settings
(`SettingsDep`) and the caller (`OwnerDep`, service/api/auth.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from functools import lru_cache
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from strokes.service.api.metrics import ApiMetrics
from strokes.service.api.schemas import ErrorResponse
from strokes.service.blobs.store import BlobStore
from strokes.service.queue.steering import Steering
from strokes.service.queue.store import Store
from strokes.service.shared.settings import Settings

T = TypeVar("T")


@lru_cache
def get_settings() -> Settings:
    """The settings of the environment; the app factory overrides this with its own."""
    return Settings()


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


def get_steering(request: Request) -> Steering:
    return request.app.state.steering


# Optional header and query values: typed `str` (with a None default) so the document says
# "string" rather than "string or null"; a header cannot carry a JSON null anyway.
OptionalStr = str
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
SteeringDep = Annotated[Steering, Depends(get_steering)]


async def bounded(settings: Settings, work: Awaitable[T]) -> T:
    """Redis work of one request, cut off at the deadline (TimeoutError -> 503)."""
    return await asyncio.wait_for(work, settings.redis_deadline_s)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route for these error statuses: each an ErrorResponse."""
    return {code: {"model": ErrorResponse} for code in codes}


COMMON = (401, 404, 422, 503)  # errors of every route on one job: auth, not found, invalid, Redis
