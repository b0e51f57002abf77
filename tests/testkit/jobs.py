"""Jobs over HTTP: request bodies of known cost on the tiny model, submitting one, and reading a
job's SSE stream with the one event-stream parser (the client's `strokes_client.events`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
from strokes_client.events import RawEvent, SSEParser, iter_raw

TERMINAL = ("job.completed", "job.failed", "job.canceled")

# A job of the tiny model that takes ~0.5 s: guided, one iteration, every stage.
QUICK = {
    "prompt": "a red cube on a blue sphere",
    "width": 64,
    "height": 64,
    "max_iterations": 1,
    "seed": 3,
    "draft": {"steps": 4},
    "refine": {"steps": 4},
    "plan": {"max_tokens": 8},
    "reflect": {"max_tokens": 8},
}
# A job that takes several seconds (made slow by its parameters: size, steps, iterations).
SLOW = {
    "prompt": "a red cube on a blue sphere",
    "width": 256,
    "height": 256,
    "max_iterations": 3,
    "seed": 3,
    "draft": {"steps": 60},
    "refine": {"steps": 60},
    "plan": {"max_tokens": 8},
    "reflect": {"max_tokens": 8},
}


def payload(event: RawEvent) -> Any:
    """An SSE event's data: the JSON it carries, parsed."""
    return json.loads(event.data)


def iter_events(lines: Iterable[str]) -> Iterator[RawEvent]:
    """The events of an event stream's lines, by the client's parser (one parser per stream)."""
    return iter_raw(SSEParser(), lines)


def submit(base: str, body: dict, headers: dict[str, str] | None = None) -> dict:
    """POST /v1/generations, which must be accepted (202): the job's view."""
    reply = httpx.post(base + "/v1/generations", json=body, headers=headers, timeout=10)
    assert reply.status_code == 202, reply.text
    return reply.json()


def stream_events(
    base: str,
    job_id: str,
    *,
    last_event_id: str | None = None,
    after: str | None = None,
    stop: Callable[[RawEvent], bool] | None = None,
    timeout: float = 120,
    headers: dict[str, str] | None = None,
) -> list[RawEvent]:
    """Consume the job's SSE stream until it ends (or `stop` says so); returns the events."""
    hdrs = dict(headers or {})
    if last_event_id:
        hdrs["Last-Event-ID"] = last_event_id
    params = {"after": after} if after else None
    out: list[RawEvent] = []
    with httpx.stream(
        "GET",
        f"{base}/v1/generations/{job_id}/events",
        headers=hdrs,
        params=params,
        timeout=httpx.Timeout(10, read=timeout),
    ) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["content-type"].startswith("text/event-stream")
        for event in iter_events(reply.iter_lines()):
            out.append(event)
            if stop is not None and stop(event):
                break
    return out
