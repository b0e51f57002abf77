"""What the API's routes share: dependencies on the app's state (its Store, blob store and
metrics), the deadline on a request's Redis work, and the error responses of the document.

The state is set up by the app's lifespan (service/api.py); the routes name it through the
`Annotated` aliases below (`store: StoreDep`), as they name the settings (`SettingsDep`) and the
caller (`OwnerDep`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from strokes.service.blobs.store import BlobStore
from strokes.service.queue.store import Store
from strokes.service.schemas import ErrorResponse
from strokes.service.shared.metrics import ApiMetrics
from strokes.service.shared.settings import Settings

T = TypeVar("T")


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


# Optional header and query values: typed `str` (with a None default) so the document says
# "string" rather than "string or null"; a header cannot carry a JSON null anyway.
OptionalStr = str
StoreDep = Annotated[Store, Depends(get_store)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]


async def bounded(settings: Settings, work: Awaitable[T]) -> T:
    """Redis work of one request, cut off at the deadline (TimeoutError -> 503)."""
    return await asyncio.wait_for(work, settings.redis_deadline_s)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route for these error statuses: each an ErrorResponse."""
    return {code: {"model": ErrorResponse} for code in codes}


COMMON = (401, 404, 422, 503)  # errors of every route on one job: auth, not found, invalid, Redis
