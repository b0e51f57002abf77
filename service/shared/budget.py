"""The compute budget of a generation: one formula, checked by the API before a job is queued.

The API holds no model, so every figure is a worst case derived from the request alone:

    image_tokens(w, h) = (w / 16) * (h / 16)                  generation tokens of one image
    branches(s)        = 1 + (cfg_text_scale > 1) + (cfg_img_scale > 1)   CFG forwards per step
    image_cost(s)      = image_tokens * branches(s) * steps(s)
    previews(s)        = steps(s) // preview_every           (0 without previews)
    cost = sum over the images the job may draw of
               image_cost(s) + previews(s) * image_tokens * PREVIEW_WEIGHT
         + sum over the text stages it may decode of max_tokens * TEXT_TOKEN_WEIGHT

in "token-steps" (one generation token through one denoising forward). A guided job draws at most
2 images per iteration (draft with `draft`, refine with `refine`) and decodes a plan and a
reflection per iteration; an interleaved one may draw up to 2 images per iteration, each drafted
or refined (the dearer settings count), and decode up to 3 text segments per iteration plus one.

The context's RoPE positions (checked against `max_positions`, the model's
max_position_embeddings): every text token takes a position, an image block takes one (BAGEL puts
all tokens of an image at the same position). Text is bounded by its UTF-8 bytes (a token is never
shorter than a byte), plus a fixed allowance per message for the chat template's tokens.

The events a job can emit bound its event stream (so a job within budget never loses events to
trimming): 2 per stage plus one per text token and per denoising step, one per iteration, and a
few for the job itself, once per attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from strokes.model.spec.prompts import DEFAULT_TEMPLATES, GEN_THINK_SYSTEM_PROMPT, INTERLEAVED_PROMPT

TOKEN_PIXELS = 16  # pixels per generation-token side (VAE downsample 8 x latent patch 2)
TEXT_TOKEN_WEIGHT = 64  # a decoded token costs about a 64-token forward (memory-bound decode)
PREVIEW_WEIGHT = 4  # a preview's VAE decode, per generation token of the image
MESSAGE_OVERHEAD = 16  # chat-template tokens around one message (<|im_start|>user\n ... <|im_end|>)
IMAGE_POSITIONS = 3  # <|vision_start|>, the image (one position), <|vision_end|>
JOB_EVENTS = 4  # job.queued, job.started, the terminal event, a hand-back's job.queued


@dataclass(frozen=True)
class Estimate:
    cost: int  # token-steps
    positions: int  # worst-case RoPE positions of the context
    events: int  # events of one attempt, at most
    images: int  # images drawn, at most


def image_tokens(width: int, height: int) -> int:
    return (width // TOKEN_PIXELS) * (height // TOKEN_PIXELS)


def branches(image: dict[str, Any]) -> int:
    return (
        1 + (float(image.get("cfg_text_scale", 4.0)) > 1.0) + (float(image.get("cfg_img_scale", 1.0)) > 1.0)
    )


def _image_cost(image: dict[str, Any], tokens: int, preview_every: int) -> int:
    steps = int(image.get("steps", 50))
    previews = steps // preview_every if preview_every else 0
    return tokens * branches(image) * steps + previews * tokens * PREVIEW_WEIGHT


def _text_bytes(text: str) -> int:
    return len(text.encode())


def estimate(record: dict[str, Any]) -> Estimate:
    """The worst case of a job record (GenerationRequest.job_record())."""
    iterations = int(record.get("max_iterations", 3))
    if (record.get("fork") or {}).get("instruction") is not None:
        iterations *= 2  # a follow-up replays the parent's iterations, then runs up to as many new ones
    tokens = image_tokens(int(record.get("width", 1024)), int(record.get("height", 1024)))
    every = int(record.get("preview_every", 0))
    draft, refine = record.get("draft", {}), record.get("refine", {})
    plan_max = int(record.get("plan", {}).get("max_tokens", 512))
    reflect_max = int(record.get("reflect", {}).get("max_tokens", 256))
    draft_steps, refine_steps = int(draft.get("steps", 50)), int(refine.get("steps", 50))
    prompt = _text_bytes(record.get("prompt", ""))
    templates = {**DEFAULT_TEMPLATES, **record.get("templates", {})}
    longest_template = max(_text_bytes(t) for t in templates.values())
    instruction = longest_template + prompt + MESSAGE_OVERHEAD  # one stage instruction, at most
    positions = _text_bytes(GEN_THINK_SYSTEM_PROMPT) + 2 * MESSAGE_OVERHEAD
    if record.get("input_image"):
        positions += 2 * IMAGE_POSITIONS  # its ViT and VAE blocks
    if record.get("protocol", "guided") == "interleaved":
        images = 2 * iterations
        segments = 3 * iterations + 1
        longest = max(plan_max, reflect_max)
        per_image = max(_image_cost(draft, tokens, every), _image_cost(refine, tokens, every))
        cost = images * per_image + segments * longest * TEXT_TOKEN_WEIGHT
        positions += _text_bytes(INTERLEAVED_PROMPT) + prompt + MESSAGE_OVERHEAD
        positions += segments * (longest + MESSAGE_OVERHEAD) + images * IMAGE_POSITIONS
        events = segments * (longest + 2) + images * (max(draft_steps, refine_steps) + 2) + iterations
    else:
        images = 2 * iterations
        cost = iterations * (
            _image_cost(draft, tokens, every)
            + _image_cost(refine, tokens, every)
            + (plan_max + reflect_max) * TEXT_TOKEN_WEIGHT
        )
        positions += iterations * (2 * instruction + plan_max + reflect_max + 2 * IMAGE_POSITIONS)
        events = iterations * (plan_max + reflect_max + draft_steps + refine_steps + 9)
    # Each pause (steering) adds job.paused, job.resumed and the next attempt's job.started.
    events += 3 * iterations * len(record.get("pause_after") or ())
    return Estimate(cost=cost, positions=positions, events=events + JOB_EVENTS, images=images)


class OverBudget(ValueError):
    """The request exceeds a limit; `limit` names the setting, `figure` is the request's value."""

    def __init__(self, message: str, limit: str, figure: int, maximum: int):
        super().__init__(message)
        self.limit, self.figure, self.maximum = limit, figure, maximum


def check(record: dict[str, Any], *, max_cost: int, max_positions: int, max_events: int) -> Estimate:
    """The estimate, or OverBudget naming the first limit the request exceeds."""
    est = estimate(record)
    if est.cost > max_cost:
        raise OverBudget(
            f"the request's compute cost is {est.cost:,} token-steps, over the limit of {max_cost:,} "
            "(STROKES_MAX_JOB_COST); use fewer iterations or steps, a smaller size, or fewer previews",
            "max_job_cost",
            est.cost,
            max_cost,
        )
    if est.positions > max_positions:
        raise OverBudget(
            f"the request's context could reach {est.positions:,} positions, over the model's limit "
            f"of {max_positions:,} (STROKES_MAX_POSITIONS); use fewer iterations, shorter texts or "
            "lower max_tokens",
            "max_positions",
            est.positions,
            max_positions,
        )
    if est.events > max_events:
        raise OverBudget(
            f"the request could emit {est.events:,} events per attempt, over the limit of "
            f"{max_events:,} (STROKES_EVENTS_MAXLEN / STROKES_MAX_ATTEMPTS); lower max_tokens, steps "
            "or iterations",
            "max_events",
            est.events,
            max_events,
        )
    return est
