"""Bodies of the OpenAI-compatible Images API (OpenAI's names, ranges and shapes, read from the
openai-python types), and the mapping of one request onto the native GenerationRequest: `size` ->
width and height, `quality` -> max_iterations, the `strokes` extension -> native fields, the
process's token counts -> OpenAI's `usage`. docs/openai.md has the table.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from strokes.service.api.errors import InvalidRequest
from strokes.service.api.schemas import GenerationRequest
from strokes.service.shared.settings import Settings

SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# quality -> iterations of plan, draft, reflect, refine (auto, standard: the native default)
QUALITY_ITERATIONS = {"low": 1, "medium": 2, "high": 3, "hd": 3, "xhigh": 3, "max": 3}
SET_BY_OPENAI_FIELDS = {"prompt": "prompt", "width": "size", "height": "size", "input_image": "image"}


# ---- request and response bodies ----------------------------------------------------------------


class ImageOptions(BaseModel):
    """Fields shared by generations and edits; OpenAI's names and ranges."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="what to draw (or, for an edit, what to change)")
    model: str | None = Field(None, description="accepted and ignored: one model serves here")
    n: int | None = Field(1, ge=1, le=10, description="images, one job each")
    size: str | None = Field(
        "auto", description='"WIDTHxHEIGHT" (multiples of 16, 32..max side) or "auto" (the native default)'
    )
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"] | None = Field(
        None, description="low, medium, high: 1, 2, 3 iterations at most; auto: the native default"
    )
    response_format: Literal["url", "b64_json"] | None = Field(None, description="default b64_json")
    output_format: Literal["png", "jpeg", "webp"] | None = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="accepted and ignored")
    background: Literal["opaque", "auto"] | None = Field(None, description="transparent is not supported")
    moderation: Literal["low", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    stream: bool | None = False
    partial_images: int | None = Field(None, ge=0, le=3)
    strokes: dict[str, Any] | None = Field(
        None, description="native POST /v1/generations fields (an extension of this server)"
    )


class ImageGenerationRequest(ImageOptions):
    """POST /v1/images/generations."""


class ImageEditFields(ImageOptions):
    """The non-file fields of POST /v1/images/edits."""

    input_fidelity: Literal["high", "low"] | None = Field(None, description="accepted and ignored")


# The edit's multipart body as the document shows it (the route reads the form itself).
EDIT_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"},
                        **{
                            name: {"type": "string", "description": field.description or name}
                            for name, field in ImageEditFields.model_fields.items()
                            if name != "prompt"
                        },
                        "prompt": {"type": "string"},
                    },
                }
            }
        },
    }
}


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = Field(None, description="the first plan the model wrote")


class TokenDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class ImageUsage(BaseModel):
    input_tokens: int
    input_tokens_details: TokenDetails
    output_tokens: int
    output_tokens_details: TokenDetails
    total_tokens: int


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: str
    quality: str
    size: str
    usage: ImageUsage


# ---- from OpenAI's request to the native one ----------------------------------------------------


def validation_param(exc: ValidationError, prefix: str = "") -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    param = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or None)
    return (f"{param}: {first.get('msg')}" if param else first.get("msg", "invalid value")), param


def native_request(opts: ImageOptions, input_image: str | None, settings: Settings) -> GenerationRequest:
    """The GenerationRequest of one of the n jobs; bad values are InvalidRequest naming the field."""
    body = dict(opts.strokes or {})
    for field, openai_field in SET_BY_OPENAI_FIELDS.items():
        if field in body:
            raise InvalidRequest(
                f"strokes.{field} is set by the `{openai_field}` field", param=f"strokes.{field}"
            )
    body["prompt"] = opts.prompt
    if opts.size not in (None, "auto"):
        match = SIZE.match(opts.size)
        if not match:
            raise InvalidRequest('size must be "WIDTHxHEIGHT" or "auto"', param="size")
        body["width"], body["height"] = int(match.group(1)), int(match.group(2))
        if max(body["width"], body["height"]) > settings.max_side:
            raise InvalidRequest(f"size: each side is at most {settings.max_side}", param="size")
    iterations = QUALITY_ITERATIONS.get(opts.quality or "auto")
    if iterations is not None:
        body.setdefault("max_iterations", iterations)
    if input_image is not None:
        body["input_image"] = input_image
    try:
        request = GenerationRequest(**body)
    except ValidationError as exc:
        message, param = validation_param(exc)
        if param in ("width", "height"):
            message, param = f"size: {message}", "size"
        elif param not in ("prompt", "input_image", None):
            message, param = f"strokes.{message}", f"strokes.{param}"
        raise InvalidRequest(message, param="image" if param == "input_image" else param) from exc
    return request


def check_stream(opts: ImageOptions) -> None:
    if opts.stream and (opts.n or 1) > 1:
        raise InvalidRequest("stream supports n = 1 only", param="n")


def usage(jobs_usage: list[dict[str, int]]) -> ImageUsage:
    """The jobs' token counts in OpenAI's fields: input = tokens computed into the context, output
    = text tokens the model wrote (images are not counted in tokens here)."""
    prefilled = sum(int(u.get("prefilled_tokens", 0)) for u in jobs_usage)
    generated = sum(int(u.get("generated_tokens", 0)) for u in jobs_usage)
    return ImageUsage(
        input_tokens=prefilled,
        input_tokens_details=TokenDetails(image_tokens=0, text_tokens=prefilled),
        output_tokens=generated,
        output_tokens_details=TokenDetails(image_tokens=0, text_tokens=generated),
        total_tokens=prefilled + generated,
    )


def _size(native: GenerationRequest) -> str:
    return f"{native.width}x{native.height}"
