"""Request and response bodies of the HTTP API (pydantic), and the request -> GenerationParams step.

The request mirrors model.generation.params.GenerationParams field for field, with the same ranges, so the
OpenAPI document tells clients the real limits; `to_params` then runs GenerationParams.validate()
as the final word. Unknown fields are rejected (`extra="forbid"`).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from strokes.model.spec.params import (
    DRAFT_DEFAULTS,
    MAX_SIDE,
    MIN_SIDE,
    MIN_TEMPERATURE,
    REFINE_DEFAULTS,
    SIZE_MULTIPLE,
    GenerationParams,
    ImageSettings,
    TextSettings,
)
from strokes.model.spec.prompts import TEMPLATE_NAMES
from strokes.service.shared.webhooks import EVENTS as WEBHOOK_EVENTS

MAX_PROMPT_CHARS = 4000
MAX_TEMPLATE_CHARS = 4000
# Chat-template control tokens (`<|im_end|>`, `<|vision_start|>`, ...). Typed by a user they must
# never reach the tokenizer as control tokens; we refuse them outright with a clear 422.
_CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>")

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _reject_control_tokens(text: str, what: str) -> str:
    match = _CONTROL_TOKEN.search(text)
    if match:
        raise ValueError(f"{what} contains the reserved token string {match.group(0)!r}")
    return text


class _ImageSettingsBase(BaseModel):
    model_config = _STRICT

    steps: int = Field(
        50,
        ge=2,
        le=200,
        description="timesteps of the schedule; steps - 1 denoising steps run (the `steps` that "
        "image.progress and stage.completed report)",
    )
    cfg_text_scale: float = Field(4.0, ge=0.0, le=20.0)
    cfg_img_scale: float = Field(1.0, ge=0.0, le=20.0)
    cfg_interval: tuple[float, float] = Field((0.4, 1.0), description="[lo, hi], 0 <= lo <= hi <= 1")
    cfg_renorm_type: Literal["global", "channel", "text_channel"] = "global"
    cfg_renorm_min: float = Field(0.0, ge=0.0, le=1.0)
    timestep_shift: float = Field(3.0, ge=0.1, le=10.0)

    @field_validator("cfg_interval")
    @classmethod
    def _interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError("must be [lo, hi] with 0 <= lo <= hi <= 1")
        return value

    def to_settings(self) -> ImageSettings:
        return ImageSettings(**self.model_dump())


class DraftSettings(_ImageSettingsBase):
    """Denoising settings of drafts (BAGEL's text-to-image defaults)."""


class RefineSettings(_ImageSettingsBase):
    """Denoising settings of refinements (BAGEL's edit defaults)."""

    cfg_img_scale: float = Field(REFINE_DEFAULTS.cfg_img_scale, ge=0.0, le=20.0)
    cfg_interval: tuple[float, float] = Field(
        REFINE_DEFAULTS.cfg_interval, description="[lo, hi], 0 <= lo <= hi <= 1"
    )
    cfg_renorm_type: Literal["global", "channel", "text_channel"] = REFINE_DEFAULTS.cfg_renorm_type


assert DraftSettings().to_settings() == DRAFT_DEFAULTS
assert RefineSettings().to_settings() == REFINE_DEFAULTS


class _TextSettingsBase(BaseModel):
    model_config = _STRICT

    max_tokens: int = Field(512, ge=1, le=4096)
    do_sample: bool = False
    temperature: float = Field(0.3, ge=MIN_TEMPERATURE, le=2.0)

    def to_settings(self) -> TextSettings:
        return TextSettings(**self.model_dump())


class PlanSettings(_TextSettingsBase):
    """Decoding of plans."""


class ReflectSettings(_TextSettingsBase):
    """Decoding of reflections."""

    max_tokens: int = Field(256, ge=1, le=4096)


TemplateName = Literal[tuple(sorted(TEMPLATE_NAMES))]  # type: ignore[valid-type]
WebhookEvent = Literal[WEBHOOK_EVENTS]  # type: ignore[valid-type]


class ForkRequest(BaseModel):
    """Start from a completed stage of an earlier generation of the same key (docs/steering.md)."""

    model_config = _STRICT

    job_id: str = Field(max_length=64, description="the parent generation")
    iteration: int | None = Field(None, ge=1, le=64, description="with stage: the fork point")
    stage: Literal["plan", "draft", "reflect", "refine", "instruction"] | None = Field(
        None, description="start from the boundary after this stage of that iteration"
    )
    text: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="replaces that stage's text (plan, reflect, instruction)",
    )
    instruction: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="instead of a stage: a follow-up instruction after the parent's final image",
    )

    @field_validator("text", "instruction")
    @classmethod
    def _no_control_tokens(cls, value: str | None) -> str | None:
        return _steering_text(value)


def _steering_text(value: str | None) -> str | None:
    """A caller's words for the context (an edit, an instruction): the prompt's rules."""
    if value is not None:
        if not value.strip():
            raise ValueError("must not be blank")
        _reject_control_tokens(value, "the text")
    return value


# Request fields a fork takes from its parent (it may set only fork, pause_after, preview_every).
FORK_INHERITS = frozenset(
    {"prompt", "protocol", "width", "height", "max_iterations", "draft", "refine", "plan", "reflect"}
    | {"seed", "think", "templates", "input_image"}
)


class GenerationRequest(BaseModel):
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

    prompt: str | None = Field(
        None, min_length=1, max_length=MAX_PROMPT_CHARS, description="required, except for a fork"
    )
    protocol: Literal["guided", "interleaved"] = "guided"
    width: int = Field(1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
    height: int = Field(1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
    max_iterations: int = Field(3, ge=1, le=8)
    draft: DraftSettings = Field(default_factory=DraftSettings)
    refine: RefineSettings = Field(default_factory=RefineSettings)
    plan: PlanSettings = Field(default_factory=PlanSettings)
    reflect: ReflectSettings = Field(default_factory=ReflectSettings)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    think: bool = True
    templates: dict[TemplateName, str] = Field(
        default_factory=dict, description="stage instruction overrides; `{prompt}` is replaced"
    )
    preview_every: int = Field(0, ge=0, le=200, description="a preview image every k steps (0: none)")
    input_image: str | None = Field(
        None,
        max_length=24 * 1024 * 1024,
        description="start image (edit): base64 or a data: URL of a PNG, JPEG or WebP",
    )
    fork: ForkRequest | None = Field(None, description="start from a stage of an earlier generation")
    pause_after: list[Literal["plan", "reflect"]] = Field(
        default_factory=list, max_length=2, description="pause (status paused) after these stages"
    )

    webhook_url: str | None = Field(
        None,
        max_length=2048,
        description="POST signed events here (Standard Webhooks); docs/webhooks.md",
    )
    webhook_events: list[WebhookEvent] | None = Field(
        None, min_length=1, description="events to deliver; default the terminal ones"
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.strip():
            raise ValueError("must not be blank")
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return _reject_control_tokens(value, "prompt")

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if len(text) > MAX_TEMPLATE_CHARS:
                raise ValueError(f"template {name} is longer than {MAX_TEMPLATE_CHARS} characters")
            _reject_control_tokens(text, f"template {name}")
        return value

    @model_validator(mode="after")
    def _webhook(self) -> GenerationRequest:
        if self.webhook_events is not None and self.webhook_url is None:
            raise ValueError("webhook_events needs a webhook_url")
        return self

    def job_record(self) -> dict[str, Any]:
        """What the job hash keeps of the request: everything but the image bytes."""
        record = self.model_dump(mode="json", exclude={"input_image"})
        record["input_image"] = self.input_image is not None
        return record

    def fingerprint(self) -> str:
        """A hash of the whole request, to tell a retried POST from a different one."""
        body = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()


def params_from_record(
    record: dict[str, Any], input_image=None, max_side: int = MAX_SIDE
) -> GenerationParams:
    """The validated GenerationParams of a stored request (the worker's side of the contract)."""
    params = GenerationParams(
        prompt=record["prompt"],
        protocol=record.get("protocol", "guided"),
        width=int(record.get("width", 1024)),
        height=int(record.get("height", 1024)),
        max_iterations=int(record.get("max_iterations", 3)),
        draft=DraftSettings(**record.get("draft", {})).to_settings(),
        refine=RefineSettings(**record.get("refine", {})).to_settings(),
        plan=PlanSettings(**record.get("plan", {})).to_settings(),
        reflect=ReflectSettings(**record.get("reflect", {})).to_settings(),
        seed=record.get("seed"),
        think=bool(record.get("think", True)),
        input_image=input_image,
        templates=dict(record.get("templates", {})),
        preview_every=int(record.get("preview_every", 0)),
    )
    return params.validate(max_side=max_side)


# ---- responses ----------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


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

    model_config = _STRICT

    text: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="replace the paused stage's text (else go on unchanged)",
    )

    @field_validator("text")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return _steering_text(value)


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


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    redis: bool
    workers: int
    reason: str | None = None
