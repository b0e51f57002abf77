"""This server's defaults for a new generation: one truth for what a request that leaves a field out
gets, and for what GET /v1/info says it gets (the studio fills its form from it).

Two profiles, chosen by the operator (STROKES_REQUEST_DEFAULTS), never by which workers happen to be
alive when a request comes in:

    model  the request schema's own defaults (BAGEL's entry points: 1024 x 1024, 3 iterations,
           50 steps, plans of 512 tokens): what a GPU deployment serves
    cpu    a size and step count that finish in minutes on a CPU worker (`strokes serve --device
           cpu` and `make demo` set it)

A profile fills only the fields a request leaves out (nested ones too: `{"draft": {"cfg_text_scale":
5}}` still gets the profile's steps); what a caller sends is never changed. A fork takes its
parent's values, never a profile's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from strokes.service.api.schemas import GenerationRequest
from strokes.service.shared.messages import DraftSettings, PlanSettings, ReflectSettings

Profile = Literal["model", "cpu"]


class Defaults(BaseModel):
    """What a new generation gets for the fields it leaves out (this server's profile)."""

    protocol: Literal["guided", "interleaved"]
    width: int
    height: int
    max_iterations: int
    steps: int  # draft.steps and refine.steps
    preview_every: int
    plan_max_tokens: int
    reflect_max_tokens: int


def _model() -> Defaults:
    fields = GenerationRequest.model_fields
    return Defaults(
        protocol=fields["protocol"].default,
        width=fields["width"].default,
        height=fields["height"].default,
        max_iterations=fields["max_iterations"].default,
        steps=DraftSettings.model_fields["steps"].default,
        preview_every=fields["preview_every"].default,
        plan_max_tokens=PlanSettings.model_fields["max_tokens"].default,
        reflect_max_tokens=ReflectSettings.model_fields["max_tokens"].default,
    )


PROFILES: dict[str, Defaults] = {
    "model": _model(),
    "cpu": _model().model_copy(
        update={
            "width": 256,
            "height": 256,
            "max_iterations": 2,
            "steps": 12,
            "preview_every": 2,
            "plan_max_tokens": 64,
            "reflect_max_tokens": 64,
        }
    ),
}


def defaults(profile: Profile) -> Defaults:
    return PROFILES[profile]


def apply(request: GenerationRequest, profile: Profile) -> GenerationRequest:
    """`request` with the fields it left out taken from the profile (a fork's are its parent's)."""
    if profile == "model" or request.fork is not None:
        return request  # the schema's defaults are the model profile's
    d, given = PROFILES[profile], request.model_fields_set
    top: dict[str, Any] = {
        name: getattr(d, name)
        for name in ("protocol", "width", "height", "max_iterations", "preview_every")
        if name not in given
    }
    nested = {"draft": ("steps", d.steps), "refine": ("steps", d.steps)}
    nested |= {"plan": ("max_tokens", d.plan_max_tokens), "reflect": ("max_tokens", d.reflect_max_tokens)}
    for name, (field, value) in nested.items():
        settings = getattr(request, name)
        if field not in settings.model_fields_set:
            top[name] = settings.model_copy(update={field: value})
    return request.model_copy(update=top)
