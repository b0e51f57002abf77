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

A run that starts from a recorded trajectory (a fork, a follow-up at any depth, a resume after a
pause) is priced by its real context: the positions the trajectory's stages hold (the worker
records them; a replaced text is counted in bytes) plus what the run may still add, at most
max_iterations iterations toward the prompt, or toward the follow-up's instruction
(`resumption`, `estimate_resumed`). Replayed stages cost no token-steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

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


def _start_positions(p: GenerationParams, input_image: bool) -> int:
    """The context before the first stage: the system prompt, an input image's two blocks."""
    positions = _text_bytes(GEN_THINK_SYSTEM_PROMPT) + 2 * MESSAGE_OVERHEAD
    if input_image:
        positions += 2 * IMAGE_POSITIONS  # its ViT and VAE blocks
    return positions


def _rounds(p: GenerationParams, geometry: Geometry, iterations: int, prompt: str) -> Estimate:
    """The worst case of `iterations` iterations toward `prompt` (the request's, or a follow-up's
    instruction), the context they add included but not the context they start from."""
    tokens = generation_tokens(geometry, p.width, p.height)
    every = p.preview_every
    prompt_bytes = _text_bytes(prompt)
    templates = {**DEFAULT_TEMPLATES, **p.templates}
    longest_template = max(_text_bytes(t) for t in templates.values())
    instruction = longest_template + prompt_bytes + MESSAGE_OVERHEAD  # one stage instruction, at most
    plan_max, reflect_max = p.plan.max_tokens, p.reflect.max_tokens
    images = 2 * iterations
    if p.protocol == "interleaved":
        segments = 3 * iterations + 1
        longest = max(plan_max, reflect_max)
        per_image = max(_image_cost(p.draft, tokens, every), _image_cost(p.refine, tokens, every))
        cost = images * per_image + segments * longest * TEXT_TOKEN_WEIGHT
        positions = _text_bytes(INTERLEAVED_PROMPT) + prompt_bytes + MESSAGE_OVERHEAD
        positions += segments * (longest + MESSAGE_OVERHEAD) + images * IMAGE_POSITIONS
        events = segments * (longest + 2) + images * (max(p.draft.steps, p.refine.steps) + 2) + iterations
    else:
        cost = iterations * (
            _image_cost(p.draft, tokens, every)
            + _image_cost(p.refine, tokens, every)
            + (plan_max + reflect_max) * TEXT_TOKEN_WEIGHT
        )
        positions = iterations * (2 * instruction + plan_max + reflect_max + 2 * IMAGE_POSITIONS)
        events = iterations * (plan_max + reflect_max + p.draft.steps + p.refine.steps + 9)
    return Estimate(cost=cost, positions=positions, events=events, images=images)


def estimate(
    p: GenerationParams, geometry: Geometry = BAGEL_7B_MOT, *, input_image: bool, iterations: int
) -> Estimate:
    """The worst case of a fresh run of `p` over `iterations` iterations with or without an input
    image (`p.input_image` holds pixels only on a worker)."""
    rounds = _rounds(p, geometry, iterations, p.prompt)
    return replace(rounds, positions=_start_positions(p, input_image) + rounds.positions)


# ---- runs that start from a recorded context: forks, follow-ups (at any depth), resumes ----------

REPLAY_EVENTS = 3  # a replayed stage's events: stage.started, stage.completed, iteration.completed


@dataclass(frozen=True)
class Resumption:
    """Where a run that replays a recorded trajectory starts, and what it may still add."""

    positions: int  # the replayed context's RoPE positions (recorded_positions)
    stages: int  # stage records replayed
    iterations: int  # iterations it may run live after them
    prompt: str  # what those iterations are toward: the request's prompt, or the latest follow-up's


def stage_positions(stage: dict[str, Any], protocol: str) -> int:
    """An upper bound of the positions one recorded stage added to the context (its texts in bytes,
    each with a message's allowance, and its image's blocks)."""
    positions = 0
    if stage["stage"] == "instruction":  # a follow-up: the final image goes in (and, interleaved,
        if stage.get("appended_image"):  # the instruction as its own prompt; guided renders it
            positions += 2 * IMAGE_POSITIONS  # into the next plan's instruction)
        if protocol == "interleaved":
            positions += _text_bytes(INTERLEAVED_PROMPT + stage.get("instruction", "")) + MESSAGE_OVERHEAD
        return positions
    for key in ("instruction", "text"):
        if stage.get(key) is not None:
            positions += _text_bytes(stage[key]) + MESSAGE_OVERHEAD
    if stage.get("image") and stage.get("appended_to_context"):
        positions += 2 * IMAGE_POSITIONS  # its VAE and ViT blocks
    return positions


def recorded_positions(p: GenerationParams, stages: list[dict[str, Any]], *, input_image: bool) -> int:
    """The RoPE positions of the context after these recorded stages (a trajectory cut at a fork
    point): the latest `positions` a stage recorded (the worker writes the real figure,
    model/generation/run.py; a replaced text drops it, model/spec/forks.py), plus an upper bound of
    the stages after it; without any, counted from the start."""
    base, rest = _start_positions(p, input_image), stages
    if p.protocol == "interleaved":
        base += _text_bytes(INTERLEAVED_PROMPT) + _text_bytes(p.prompt) + MESSAGE_OVERHEAD
    for i in range(len(stages) - 1, -1, -1):
        if "positions" in stages[i]:
            base, rest = int(stages[i]["positions"]), stages[i + 1 :]
            break
    return base + sum(stage_positions(stage, p.protocol) for stage in rest)


def resumption(
    p: GenerationParams, stages: list[dict[str, Any]], *, instruction: str | None, input_image: bool
) -> Resumption:
    """A run of `p` that replays `stages` (model/spec/forks.py's cut: a fork point's, a pause's, or
    the whole parent for a follow-up `instruction`) and then runs on live."""
    positions = recorded_positions(p, stages, input_image=input_image)
    follow_ups = [s for s in stages if s["stage"] == "instruction"]
    prompt = follow_ups[-1]["instruction"] if follow_ups else p.prompt
    if instruction is not None:  # the final image goes into the context, then new iterations
        return Resumption(positions + 2 * IMAGE_POSITIONS, len(stages), p.max_iterations, instruction)
    first = int(follow_ups[-1]["iteration"]) if follow_ups else 1  # the iterations toward `prompt`
    left = first + p.max_iterations - int(stages[-1]["iteration"]) if stages else p.max_iterations
    return Resumption(positions, len(stages), max(1, min(p.max_iterations, left)), prompt)


def estimate_resumed(p: GenerationParams, r: Resumption, geometry: Geometry = BAGEL_7B_MOT) -> Estimate:
    """The worst case of a resumed run: the replayed context, then up to `r.iterations` live ones.
    Replaying decodes and denoises nothing: it costs no token-steps, only its events."""
    live = _rounds(p, geometry, r.iterations, r.prompt)
    return replace(
        live, positions=r.positions + live.positions, events=live.events + REPLAY_EVENTS * r.stages
    )
