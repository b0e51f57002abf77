"""The asyncio client: the same API as `Client` (sync.py), with `async`/`await`.

async with AsyncClient("http://127.0.0.1:8000") as client:
    job = await client.create(prompt="a red cube on a blue sphere", width=256, height=256)
    async for event in client.events(job.id):
        ...
    job = await client.wait(job.id)
    png = await client.download_image(job.id, job.final_image)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from strokes_client import _base
from strokes_client._base import Options
from strokes_client.events import Event as StreamEvent
from strokes_client.events import SSEParser, StreamError, aiter_raw, parse
from strokes_client.models import APIError, Job, Page, StrokesError


class AsyncClient:
    def __init__(
        self,
        base_url: str = Options.base_url,
        api_key: str | None = None,
        *,
        timeout_s: float = Options.timeout_s,
        max_retries: int = Options.max_retries,
        backoff_s: float = Options.backoff_s,
        max_backoff_s: float = Options.max_backoff_s,
        http: httpx.AsyncClient | None = None,
    ):
        """`http`: an httpx.AsyncClient of your own (proxies, TLS, event hooks); its base URL is set."""
        self.options = Options(
            base_url.rstrip("/"), api_key, timeout_s, max_retries, backoff_s, max_backoff_s
        )
        self.http = http or httpx.AsyncClient()
        self.http.base_url = self.options.base_url
        self.http.headers.update(self.options.headers())
        self.http.timeout = httpx.Timeout(timeout_s)
        self.reconnects = 0  # event-stream reconnections so far (for logs and tests)

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transport ------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call with retries on 429/503 and connection failures; APIError on other errors."""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.http.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt > self.options.max_retries:
                    raise
                await asyncio.sleep(_base.backoff(self.options, attempt))
                continue
            delay = _base.should_retry(self.options, attempt, response)
            if delay is not None:
                await asyncio.sleep(delay)
                continue
            if response.status_code >= 400:
                raise _base.api_error(response)
            return response

    # -- jobs -----------------------------------------------------------------------------------

    async def create(
        self,
        request: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        wait: float | None = None,
        **fields: Any,
    ) -> Job:
        """Start a generation from a request dict and/or keyword fields (prompt, width, ...).
        An Idempotency-Key is made up when none is given, and kept across retries. `wait`: ask the
        service to hold the answer up to that many seconds for the job to end (Prefer: wait)."""
        body = _base.generation_body(request, fields)
        headers = _base.create_headers(idempotency_key, wait)
        timeout = self.options.timeout_s + (wait or 0)
        return Job.from_json(
            (
                await self._request("POST", "/v1/generations", json=body, headers=headers, timeout=timeout)
            ).json()
        )

    async def get(self, job_id: str) -> Job:
        return Job.from_json((await self._request("GET", f"/v1/generations/{job_id}")).json())

    async def list(self, *, status: str | None = None, limit: int = 20, after: str | None = None) -> Page:
        """One page of your jobs, newest first."""
        params = _base.list_params(status, limit, after)
        return Page.from_json((await self._request("GET", "/v1/generations", params=params)).json())

    async def iter_jobs(self, *, status: str | None = None, page_size: int = 100) -> AsyncIterator[Job]:
        """Every one of your jobs, newest first, fetching pages as it goes."""
        after = None
        while True:
            page = await self.list(status=status, limit=page_size, after=after)
            for job in page.data:
                yield job
            if not page.has_more:
                return
            after = page.next_cursor

    async def cancel(self, job_id: str) -> Job:
        """Cancel (idempotent). A running job stops at its next step; `wait` for its end."""
        return Job.from_json((await self._request("DELETE", f"/v1/generations/{job_id}")).json())

    async def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        raise_on_failure: bool = False,
        through_pauses: bool = False,
    ) -> Job:
        """Until the job ends or pauses (following its events); it returns a paused job unless
        `through_pauses`. As `Client.wait`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        job = await self.get(job_id)
        if _base.wait_is_over(job, through_pauses):
            return _base.finished(job, raise_on_failure)
        async with contextlib.aclosing(self._events(job_id, None, deadline)) as events:
            async for event in events:
                if event.terminal:
                    break
                if event.name == "job.paused" and not through_pauses:
                    job = await self.get(job_id)  # else a pause already answered: go on
                    if job.is_paused:
                        return job
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"generation {job_id} did not end in time")
        return _base.finished(await self.get(job_id), raise_on_failure)

    # -- steering (docs/steering.md) ------------------------------------------------------------

    async def fork(
        self, job_id: str, iteration: int, stage: str, *, text: str | None = None, **fields: Any
    ) -> Job:
        """A new job that starts after a stage of job `job_id`, its text optionally replaced.
        As `Client.fork`."""
        fork = _base.fork_spec(job_id, iteration=iteration, stage=stage, text=text)
        return await self.create(fork=fork, **fields)

    async def follow_up(self, job_id: str, instruction: str, **fields: Any) -> Job:
        """A new job that goes on from the final image toward `instruction`. As `Client.follow_up`."""
        return await self.create(fork=_base.fork_spec(job_id, instruction=instruction), **fields)

    async def resume(self, job_id: str, *, text: str | None = None) -> Job:
        """Continue a paused job, unchanged or with the paused stage's text replaced by `text`.
        As `Client.resume`."""
        body = _base.continue_body(text)
        reply = await self._request("POST", f"/v1/generations/{job_id}/continue", json=body)
        return Job.from_json(reply.json())

    def events(self, job_id: str, *, after: str | None = None) -> AsyncIterator[StreamEvent]:
        """The job's events, typed, from the start (or after event id `after`) to the terminal
        one. A dropped connection is resumed with Last-Event-ID: no event is lost or repeated."""
        return self._events(job_id, after, None)

    async def _events(
        self, job_id: str, cursor: str | None, deadline: float | None
    ) -> AsyncIterator[StreamEvent]:
        failures = 0
        path = f"/v1/generations/{job_id}/events"
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if cursor:
                headers["Last-Event-ID"] = cursor
            read_s = None if deadline is None else max(0.1, deadline - time.monotonic())
            parser = SSEParser()
            try:
                timeout = httpx.Timeout(self.options.timeout_s, read=read_s)
                async with self.http.stream("GET", path, headers=headers, timeout=timeout) as response:
                    if response.status_code == 204:
                        return  # finished, nothing after the cursor
                    if response.status_code >= 400:
                        await response.aread()
                        delay = _base.should_retry(self.options, failures + 1, response)
                        if delay is None:
                            raise _base.api_error(response)
                        failures += 1
                        await asyncio.sleep(delay)
                        continue
                    async for raw in aiter_raw(parser, response.aiter_lines()):
                        event = parse(raw.id, raw.name, raw.data)
                        if isinstance(event, StreamError):
                            break  # the service lost its store: resume from the cursor
                        cursor, failures = raw.id or cursor, 0
                        yield event
                        if event.terminal:
                            return
            except httpx.TransportError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"generation {job_id} did not end in time") from None
            failures += 1
            if failures > self.options.max_retries:
                raise StrokesError(f"the event stream of {job_id} was lost {failures} times in a row")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"generation {job_id} did not end in time")
            self.reconnects += 1
            hint = (parser.retry_ms or 0) / 1000
            await asyncio.sleep(max(hint, _base.backoff(self.options, failures)) if failures > 1 else hint)

    # -- results --------------------------------------------------------------------------------

    async def download_image(
        self, job_id: str, image: Any, *, format: str | None = None, path: str | Path | None = None
    ) -> bytes:
        """An image's bytes (png unless `format` is jpeg or webp); also written to `path` if given.
        `image`: an ImageRef (job.final_image, job.images[i], an event's image) or an image id."""
        if image is None:
            raise ValueError("no image: the job has not produced it (yet)")
        params = {"format": format} if format else None
        reply = await self._request(
            "GET", _base.image_path(job_id, image), params=params, headers={"Accept": "*/*"}
        )
        data = reply.content
        if path is not None:
            Path(path).write_bytes(data)
        return data

    async def trajectory(self, job_id: str) -> dict[str, Any]:
        """The finished job's trajectory: every stage, its text or image file name, settings."""
        return (await self._request("GET", f"/v1/generations/{job_id}/trajectory")).json()


__all__ = ["APIError", "AsyncClient"]
