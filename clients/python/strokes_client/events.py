"""Typed events of a generation's SSE stream, and the event-stream parser.

`parse(id, name, data)` turns one SSE event into one of the classes below, by its `event:` name;
a name this client does not know becomes `UnknownEvent` (the stream goes on). Every event has
`id` (the SSE id, for resuming), `name`, `job_id`, `attempt` and `data` (the JSON object as sent).
The service documents every event in docs/events.md.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from strokes_client.models import ImageRef

TERMINAL = frozenset({"job.completed", "job.failed", "job.canceled"})


@dataclass(frozen=True)
class Event:
    name: ClassVar[str] = ""
    id: str | None
    job_id: str
    attempt: int
    data: dict[str, Any] = field(repr=False)

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL


@dataclass(frozen=True)
class JobQueued(Event):
    name: ClassVar[str] = "job.queued"
    position: int | None = None
    reason: str | None = None  # handback | retry, when a worker gave the job back
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class JobStarted(Event):
    name: ClassVar[str] = "job.started"
    worker: str = ""
    takeover: bool = False


@dataclass(frozen=True)
class StageStarted(Event):
    name: ClassVar[str] = "stage.started"
    iteration: int = 0
    stage: str = ""


@dataclass(frozen=True)
class TextDelta(Event):
    name: ClassVar[str] = "text.delta"
    iteration: int = 0
    stage: str = ""
    delta: str = ""


@dataclass(frozen=True)
class ImageProgress(Event):
    name: ClassVar[str] = "image.progress"
    iteration: int = 0
    stage: str = ""
    step: int = 0
    steps: int = 0
    preview: ImageRef | None = None


@dataclass(frozen=True)
class StageCompleted(Event):
    name: ClassVar[str] = "stage.completed"
    iteration: int = 0
    stage: str = ""
    seconds: float = 0.0
    text: str | None = None
    verdict: str | None = None
    refine_instruction: str | None = None
    image: ImageRef | None = None
    steps: int | None = None
    prefilled_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    inherited: bool = False  # a fork or resume replayed this stage from its parent


@dataclass(frozen=True)
class IterationCompleted(Event):
    name: ClassVar[str] = "iteration.completed"
    iteration: int = 0
    verdict: str = ""
    image: ImageRef | None = None


@dataclass(frozen=True)
class JobCompleted(Event):
    name: ClassVar[str] = "job.completed"
    final_image: ImageRef | None = None
    iterations: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class JobFailed(Event):
    name: ClassVar[str] = "job.failed"
    error: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobCanceled(Event):
    name: ClassVar[str] = "job.canceled"
    reason: str | None = None  # a paused job's end: "canceled while paused" | "pause_expired"
    error: dict[str, Any] | None = None  # pause_expired: {type, message}


@dataclass(frozen=True)
class JobPaused(Event):
    """Steering: the job stopped after a stage it was asked to pause after (`pause_after`); it
    waits for `Client.resume` or `Client.cancel` until `expires_at` (Unix seconds)."""

    name: ClassVar[str] = "job.paused"
    iteration: int = 0
    stage: str = ""
    text: str | None = None
    expires_at: float = 0.0


@dataclass(frozen=True)
class JobResumed(Event):
    """Steering: the paused job was continued (`edited`: with the paused stage's text replaced);
    it is queued again and its next attempt runs on from the pause."""

    name: ClassVar[str] = "job.resumed"
    iteration: int = 0
    stage: str = ""
    edited: bool = False


@dataclass(frozen=True)
class StreamError(Event):
    """The service's event store failed mid-stream; the client reconnects by itself."""

    name: ClassVar[str] = "error"
    error: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UnknownEvent(Event):
    """An event this client version does not know (`event` is its name)."""

    event: str = ""


EVENT_TYPES: dict[str, type[Event]] = {
    cls.name: cls
    for cls in (
        JobQueued,
        JobStarted,
        StageStarted,
        TextDelta,
        ImageProgress,
        StageCompleted,
        IterationCompleted,
        JobCompleted,
        JobFailed,
        JobCanceled,
        JobPaused,
        JobResumed,
        StreamError,
    )
}
_IMAGE_FIELDS = {"preview", "image", "final_image"}
_COMMON = {"id", "job_id", "attempt", "data"}


def parse(event_id: str | None, name: str, text: str) -> Event:
    data = json.loads(text) if text else {}
    if not isinstance(data, dict):
        data = {"value": data}
    cls = EVENT_TYPES.get(name)
    common = {
        "id": event_id,
        "job_id": str(data.get("job_id", "")),
        "attempt": int(data.get("attempt", 0)),
        "data": data,
    }
    if cls is None:
        return UnknownEvent(**common, event=name)
    known = set(cls.__dataclass_fields__) - _COMMON
    values = {k: v for k, v in data.items() if k in known}
    for key in _IMAGE_FIELDS & values.keys():
        values[key] = ImageRef.from_json(values[key])
    return cls(**common, **values)


# ---- text/event-stream --------------------------------------------------------------------------


@dataclass
class RawEvent:
    id: str | None  # the last id seen on the stream (SSE ids persist until replaced)
    name: str
    data: str


class SSEParser:
    """The WHATWG event-stream format: event, data (joined by newlines), id, retry, comments."""

    def __init__(self) -> None:
        self.name, self.data, self.last_id = "", [], None
        self.retry_ms: int | None = None

    def feed(self, line: str) -> RawEvent | None:
        line = line.rstrip("\r\n")
        if line == "":
            if not self.data and not self.name:
                return None
            out = RawEvent(self.last_id, self.name or "message", "\n".join(self.data))
            self.name, self.data = "", []
            return out
        if line.startswith(":"):
            return None
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            self.name = value
        elif key == "data":
            self.data.append(value)
        elif key == "id" and "\x00" not in value:
            self.last_id = value
        elif key == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


def iter_raw(parser: SSEParser, lines: Iterable[str]) -> Iterator[RawEvent]:
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event


async def aiter_raw(parser: SSEParser, lines: AsyncIterator[str]) -> AsyncIterator[RawEvent]:
    async for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event
