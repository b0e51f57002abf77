"""What a generation can cost, from its parameters and the model's geometry: one formula.

The API prices a request with it before the job is queued (service/api/budget.py: the worst case,
checked against the operator's limits); the worker sizes a job's KV caches from the same image
sizes (model/generation/budget.py). Every figure is a worst case derived from the parameters alone:

    generation_tokens(w, h) = (w / d) * (h / d)           d = the geometry's latent_downsample
    branches(s)        = 1 + (cfg_text_scale > 1) + (cfg_img_scale > 1)   CFG forwards per step
    image_cost(s)      = generation_tokens * branches(s) * steps(s)
    previews(s)        = steps(s) // preview_every           (0 without previews)
    cost = sum over the images the job may draw of
               image_cost(s) + previews(s) * generation_tokens * PREVIEW_WEIGHT
         + sum over the text stages it may decode of max_tokens * TEXT_TOKEN_WEIGHT

in "token-steps" (one generation token through one denoising forward). A guided job draws at most
2 images per iteration (draft with `draft`, refine with `refine`) and decodes a plan and a
reflection per iteration; an interleaved one may draw up to 2 images per iteration, each drafted
or refined (the dearer settings count), and decode up to 3 text segments per iteration plus one.

The context's RoPE positions: every text token takes a position, an image block takes
IMAGE_POSITIONS. Text is bounded by its UTF-8 bytes (a token is never shorter than a byte), plus a
fixed allowance per message for the chat template's tokens.

The events of the stages (2 per stage plus one per text token and per denoising step, one per
iteration) bound what a run can emit; the service adds its own (job.queued, job.started, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from strokes.model.spec.params import GenerationParams, ImageSettings
from strokes.model.spec.prompts import DEFAULT_TEMPLATES, GEN_THINK_SYSTEM_PROMPT, INTERLEAVED_PROMPT

TEXT_TOKEN_WEIGHT = 64  # a decoded token costs about a 64-token forward (memory-bound decode)
PREVIEW_WEIGHT = 4  # a preview's VAE decode, per generation token of the image
MESSAGE_OVERHEAD = 16  # chat-template tokens around one message (<|im_start|>user\n ... <|im_end|>)
# An image block's RoPE positions: <|vision_start|>, the image, <|vision_end|> (an upper bound:
# BAGEL gives the markers the image's own position).
IMAGE_POSITIONS = 3


@dataclass(frozen=True)
class Geometry:
    """The model's sizes that price a generation (BagelConfig.geometry derives them)."""

    latent_downsample: int  # pixels per generation-token side: the VAE's downsample x the latent patch


BAGEL_7B_MOT = Geometry(latent_downsample=16)  # the API holds no model: it prices for BAGEL-7B-MoT


@dataclass(frozen=True)
class Estimate:
    cost: int  # token-steps
    positions: int  # worst-case RoPE positions of the context
    events: int  # events of the stages of one run, at most
    images: int  # images drawn, at most


def generation_tokens(geometry: Geometry, width: int, height: int) -> int:
    """Generation (VAE latent) tokens of one image of this size, markers excluded."""
    d = geometry.latent_downsample
    return (width // d) * (height // d)


def branches(image: ImageSettings) -> int:
    return 1 + (image.cfg_text_scale > 1.0) + (image.cfg_img_scale > 1.0)


def _image_cost(image: ImageSettings, tokens: int, preview_every: int) -> int:
    previews = image.steps // preview_every if preview_every else 0
    return tokens * branches(image) * image.steps + previews * tokens * PREVIEW_WEIGHT


def _text_bytes(text: str) -> int:
    return len(text.encode())


def estimate(
    p: GenerationParams, geometry: Geometry = BAGEL_7B_MOT, *, input_image: bool, iterations: int
) -> Estimate:
    """The worst case of a run of `p` over `iterations` iterations (a follow-up replays its parent's
    before its own) with or without an input image (`p.input_image` holds pixels only on a worker)."""
    tokens = generation_tokens(geometry, p.width, p.height)
    every = p.preview_every
    prompt = _text_bytes(p.prompt)
    templates = {**DEFAULT_TEMPLATES, **p.templates}
    longest_template = max(_text_bytes(t) for t in templates.values())
    instruction = longest_template + prompt + MESSAGE_OVERHEAD  # one stage instruction, at most
    positions = _text_bytes(GEN_THINK_SYSTEM_PROMPT) + 2 * MESSAGE_OVERHEAD
    if input_image:
        positions += 2 * IMAGE_POSITIONS  # its ViT and VAE blocks
    plan_max, reflect_max = p.plan.max_tokens, p.reflect.max_tokens
    images = 2 * iterations
    if p.protocol == "interleaved":
        segments = 3 * iterations + 1
        longest = max(plan_max, reflect_max)
        per_image = max(_image_cost(p.draft, tokens, every), _image_cost(p.refine, tokens, every))
        cost = images * per_image + segments * longest * TEXT_TOKEN_WEIGHT
        positions += _text_bytes(INTERLEAVED_PROMPT) + prompt + MESSAGE_OVERHEAD
        positions += segments * (longest + MESSAGE_OVERHEAD) + images * IMAGE_POSITIONS
        events = segments * (longest + 2) + images * (max(p.draft.steps, p.refine.steps) + 2) + iterations
    else:
        cost = iterations * (
            _image_cost(p.draft, tokens, every)
            + _image_cost(p.refine, tokens, every)
            + (plan_max + reflect_max) * TEXT_TOKEN_WEIGHT
        )
        positions += iterations * (2 * instruction + plan_max + reflect_max + 2 * IMAGE_POSITIONS)
        events = iterations * (plan_max + reflect_max + p.draft.steps + p.refine.steps + 9)
    return Estimate(cost=cost, positions=positions, events=events, images=images)
