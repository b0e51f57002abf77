"""The API in-process: the app from its own factory (create_app) with its lifespan, driven by httpx
over ASGI against the test's Redis (no worker runs the jobs), and what its tests share."""

from __future__ import annotations

import io

import httpx
import numpy as np
from PIL import Image

from strokes.service.api.app import create_app
from strokes.service.shared.settings import Settings

# A request the in-process tests queue (no worker runs it: its cost does not matter).
SMALL = {"prompt": "a red cube", "width": 64, "height": 64, "max_iterations": 1}


class AppClient:
    """`async with AppClient(settings) as client`: an httpx client of a freshly created app, its
    lifespan entered (Redis clients, store, blob store) and left; `client.app` is the app."""

    def __init__(self, settings: Settings):
        self.app = create_app(settings)

    async def __aenter__(self) -> httpx.AsyncClient:
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://api")
        self.http.app = self.app
        return self.http

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()
        await self.lifespan.__aexit__(*exc)


def error_of(reply: httpx.Response) -> dict:
    """The error object of an error response, which must have the API's one error shape."""
    body = reply.json()
    assert set(body) == {"error"} and {"type", "message"} <= set(body["error"]), body
    return body["error"]


def black_png(width: int, height: int) -> bytes:
    """A black PNG of this size (an upload)."""
    out = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(out, format="PNG")
    return out.getvalue()
