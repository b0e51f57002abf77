"""What the API answers, as typed objects: jobs (with a fork's parent and a pause), image
references, list pages, errors.

Every object keeps the JSON it was built from in `raw`, and unknown fields are ignored, so a newer
server's additions never break an older client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
PAUSED = "paused"


@dataclass(frozen=True)
class ImageRef:
    """An image of a generation: `url` is relative to the service (`download_image` takes it)."""

    id: str
    url: str
    width: int
    height: int
    iteration: int | None = None
    stage: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ImageRef | None:
        if not data:
            return None
        return cls(
            id=data["id"],
            url=data["url"],
            width=int(data.get("width", 0)),
            height=int(data.get("height", 0)),
            iteration=data.get("iteration"),
            stage=data.get("stage"),
        )


@dataclass(frozen=True)
class ParentRef:
    """Where a fork started: the parent job and the stage after which it went on (both None for a
    follow-up instruction after the parent's final image)."""

    job_id: str
    iteration: int | None = None
    stage: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ParentRef | None:
        if not data:
            return None
        return cls(data["job_id"], data.get("iteration"), data.get("stage"))


@dataclass(frozen=True)
class PauseInfo:
    """What a paused job waits for: `resume` (optionally replacing `text`) or `cancel`, before
    `expires_at` (Unix seconds; then it ends canceled with error type `pause_expired`)."""

    iteration: int
    stage: str
    text: str | None
    expires_at: float

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> PauseInfo | None:
        if not data:
            return None
        return cls(int(data["iteration"]), data["stage"], data.get("text"), float(data["expires_at"]))


@dataclass(frozen=True)
class Job:
    """A generation, as `GET /v1/generations/{id}` shows it."""

    id: str
    status: str  # queued | running | paused | succeeded | failed | canceled
    created_at: float
    attempt: int
    request: dict[str, Any]
    started_at: float | None = None
    finished_at: float | None = None
    queue_position: int | None = None
    cancel_requested: bool = False
    stages: list[dict[str, Any]] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)
    final_image: ImageRef | None = None
    iterations: int | None = None
    timings: dict[str, float] | None = None
    usage: dict[str, int] | None = None
    error: dict[str, Any] | None = None
    parent: ParentRef | None = None  # a fork's parent and fork point
    paused: PauseInfo | None = None  # set while status is paused
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        """It ended (succeeded, failed, canceled). A paused job is not done."""
        return self.status in TERMINAL_STATUSES

    @property
    def is_paused(self) -> bool:
        return self.status == PAUSED

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(
            id=data["id"],
            status=data["status"],
            created_at=float(data["created_at"]),
            attempt=int(data.get("attempt", 0)),
            request=data.get("request") or {},
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            queue_position=data.get("queue_position"),
            cancel_requested=bool(data.get("cancel_requested", False)),
            stages=list(data.get("stages") or []),
            images=[ImageRef.from_json(i) for i in data.get("images") or []],
            final_image=ImageRef.from_json(data.get("final_image")),
            iterations=data.get("iterations"),
            timings=data.get("timings"),
            usage=data.get("usage"),
            error=data.get("error"),
            parent=ParentRef.from_json(data.get("parent")),
            paused=PauseInfo.from_json(data.get("paused")),
            raw=data,
        )


@dataclass(frozen=True)
class Page:
    """One page of `GET /v1/generations`: pass `next_cursor` as `after` for the next one."""

    data: list[Job]
    has_more: bool
    next_cursor: str | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Page:
        return cls([Job.from_json(j) for j in data["data"]], bool(data["has_more"]), data.get("next_cursor"))


class StrokesError(Exception):
    """Base of the client's errors."""


class APIError(StrokesError):
    """The service answered with an error status. `type`, `message` and `param` come from its
    `{"error": {...}}` body; `retry_after` (seconds) from its Retry-After header, if any."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        param: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(f"{status} {type}: {message}")
        self.status, self.type, self.message, self.param = status, type, message, param
        self.retry_after = retry_after


class GenerationFailed(StrokesError):
    """`wait(..., raise_on_failure=True)`: the job ended failed or canceled."""

    def __init__(self, job: Job):
        error = job.error or {}
        super().__init__(f"generation {job.id} {job.status}: {error.get('message', '')}".rstrip(": "))
        self.job = job
