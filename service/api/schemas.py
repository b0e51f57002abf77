"""Request and response bodies of the HTTP API (pydantic).

The request's fields are the job message's (service/shared/messages.py GenerationFields, with the
ranges of model.spec.params.GenerationParams); the request adds the input image's bytes, and
`job_message()` turns it into what the queue carries. Unknown fields are rejected.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from strokes.service.shared.messages import (
    MAX_PROMPT_CHARS,
    STRICT,
    GenerationFields,
    JobMessage,
    steering_text,
)


class GenerationRequest(GenerationFields):
    """POST /v1/generations: one process-driven generation."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a red cube on a blue sphere",
                    "width": 512,
                    "height": 512,
                    "max_iterations": 2,
                    "draft": {"steps": 30},
                }
            ]
        },
    )

    input_image: str | None = Field(
        None,
        max_length=24 * 1024 * 1024,
        description="start image (edit): base64 or a data: URL of a PNG, JPEG or WebP",
    )

    def job_message(self) -> JobMessage:
        """What the queue carries of the request: everything but the image's bytes."""
        values = {
            name: getattr(self, name) for name in GenerationFields.model_fields if name != "input_image"
        }
        return JobMessage.model_construct(**values, input_image=self.input_image is not None)

    def fingerprint(self) -> str:
        """A hash of the whole request, to tell a retried POST from a different one."""
        body = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()


# ---- responses ----------------------------------------------------------------------------------


class FieldError(BaseModel):
    param: str
    message: str


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class RequestErrorDetail(ErrorDetail):
    """An error answer's body; a request with several bad fields names each in `errors`."""

    errors: list[FieldError] | None = Field(
        None, description="a request with several bad fields: each, with its own message (param: the first)"
    )


class ErrorResponse(BaseModel):
    error: RequestErrorDetail


class ImageRef(BaseModel):
    id: str
    url: str
    width: int
    height: int
    iteration: int | None = None
    stage: str | None = None


class StageSummary(BaseModel):
    iteration: int
    stage: str
    seconds: float
    text: str | None = None
    verdict: str | None = None
    image: ImageRef | None = None


class ParentRef(BaseModel):
    """Where a fork started: the parent and the stage after which it went on."""

    job_id: str
    iteration: int | None = None
    stage: str | None = None


class PauseInfo(BaseModel):
    """What a paused job waits for: continue (POST .../continue) or cancel, before expires_at."""

    iteration: int
    stage: str
    text: str | None = None
    expires_at: float


class ContinueRequest(BaseModel):
    """POST /v1/generations/{id}/continue."""

    model_config = STRICT

    text: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="replace the paused stage's text (else go on unchanged)",
    )

    @field_validator("text")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return steering_text(value)


class JobLinks(BaseModel):
    self: str
    events: str
    trajectory: str


class Job(BaseModel):
    """A generation job as GET /v1/generations/{id} shows it."""

    id: str
    object: Literal["generation"] = "generation"
    status: Literal["queued", "running", "paused", "succeeded", "failed", "canceled"]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempt: int
    queue_position: int | None = None
    cancel_requested: bool = False
    request: dict[str, Any]
    stages: list[StageSummary] = []
    images: list[ImageRef] = []
    final_image: ImageRef | None = None
    iterations: int | None = None
    timings: dict[str, float] | None = None
    usage: dict[str, int] | None = None
    error: ErrorDetail | None = None
    parent: ParentRef | None = None
    paused: PauseInfo | None = None
    links: JobLinks


class Health(BaseModel):
    status: Literal["ok"]


class BlobStoreState(BaseModel):
    """The blob store as this API replica sees it (service/blobs/health.py)."""

    state: Literal["ok", "unavailable", "refused"]
    cause: str | None = Field(None, description="why it is not ok, in words")
    since: float = Field(description="when it entered this state (Unix seconds)")


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    redis: bool
    workers: int
    blob_store: BlobStoreState | None = None
    reason: str | None = None
    # host:port of the Redis master this replica writes to (through Sentinel: the one it was last
    # given; in a cluster: the node serving the service's slot); null when Redis is unreachable
    redis_master: str | None = None
