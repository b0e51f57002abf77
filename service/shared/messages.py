"""The job message: a generation's request as it crosses the queue, typed and versioned.

The API validates a request (service/api/schemas.py GenerationRequest: these fields, with the
input image's bytes) and writes the job's message into the job hash (field `request`) as JSON; the
worker reads it back with `JobMessage.from_json` (one parse, the same validators) and runs
`to_params()`. The image bytes never cross Redis: `input_image` says whether the input is in the
blob store ({job_id}/0/input). `version` changes whenever a field changes meaning; a worker
refuses a message of a version it does not know, so a rolling upgrade never misreads a job.

The fields mirror model.spec.params.GenerationParams field for field, with the same ranges, so the
OpenAPI document tells clients the real limits; GenerationParams.validate() has the last word.
Unknown fields are rejected (`extra="forbid"`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from strokes.model.spec.forks import CONTROL_TOKEN
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

MESSAGE_VERSION = 1
MAX_PROMPT_CHARS = 4000
MAX_TEMPLATE_CHARS = 4000

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _reject_control_tokens(text: str, what: str) -> str:
    """Chat-template control tokens (`<|im_end|>`, `<|vision_start|>`, ...) typed by a user must never
    reach the tokenizer as control tokens: refused outright (a 422 naming the field)."""
    match = CONTROL_TOKEN.search(text)
    if match:
        raise ValueError(f"{what} contains the reserved token string {match.group(0)!r}")
    return text


class _ImageSettingsBase(BaseModel):
    model_config = STRICT

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
    model_config = STRICT

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

    model_config = STRICT

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
        return steering_text(value)

    @model_serializer(mode="wrap")
    def _only_given(self, handler) -> dict[str, Any]:
        # The fork point as the caller gave it: a stage, or a follow-up instruction (no nulls).
        return {k: v for k, v in handler(self).items() if v is not None}


def steering_text(value: str | None) -> str | None:
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


class GenerationFields(BaseModel):
    """The fields of a generation, shared by the request (the API's GenerationRequest) and the job
    message; each adds how it carries the input image."""

    model_config = STRICT

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
    input_image: Any = None  # the request: the image's bytes (base64); the message: whether there is one
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
    def _webhook(self) -> GenerationFields:
        if self.webhook_events is not None and self.webhook_url is None:
            raise ValueError("webhook_events needs a webhook_url")
        return self


class UnknownVersion(ValueError):
    """A message of a version this process does not know (written by a newer API)."""


class JobMessage(GenerationFields):
    """A job as the queue carries it: the request without the image's bytes."""

    input_image: bool = False  # the input image is in the blob store ({job_id}/0/input)
    version: int = MESSAGE_VERSION

    @classmethod
    def from_json(cls, raw: str | bytes) -> JobMessage:
        message = cls.model_validate_json(raw)
        if message.version != MESSAGE_VERSION:
            raise UnknownVersion(
                f"job message version {message.version}; this worker reads {MESSAGE_VERSION}"
            )
        return message

    def to_json(self) -> str:
        return self.model_dump_json()

    def to_params(self, input_image=None, max_side: int = MAX_SIDE) -> GenerationParams:
        """The validated GenerationParams of this job (`input_image`: its pixels, when it has one)."""
        if self.prompt is None:
            raise ValueError("a job message always has a prompt")
        params = GenerationParams(
            prompt=self.prompt,
            protocol=self.protocol,
            width=self.width,
            height=self.height,
            max_iterations=self.max_iterations,
            draft=self.draft.to_settings(),
            refine=self.refine.to_settings(),
            plan=self.plan.to_settings(),
            reflect=self.reflect.to_settings(),
            seed=self.seed,
            think=self.think,
            input_image=input_image,
            templates=dict(self.templates),
            preview_every=self.preview_every,
        )
        return params.validate(max_side=max_side)
