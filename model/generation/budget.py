"""How many tokens a job's contexts can reach, so its KV caches are allocated once, up front.

A cache that runs out of room doubles (model/network/kv_cache.py): a copy of everything so far, twice the
memory for a moment, and a new storage that the decode's CUDA graphs must be captured for again.
A job knows its bounds before it starts: the instructions it will append (tokenised exactly), the
text stages' max_tokens, the size of every image (VAE latents + ViT tokens), so the caches are
sized from them. Generated text is re-tokenised before it is appended, which can take a few more
tokens than were decoded: a margin of 1/8 + 16 per text stage covers it. An estimate that still
falls short is not an error, only a reallocation (`KVCache.reallocations`).

The context's RoPE positions are another matter: past the model's max_position_embeddings its
rotary embedding was never trained, so a run whose context could pass it is refused before any
work (`check_positions`, InvalidParams naming `max_positions`). Their bound counts the tokens of
what the run will append: the system prompt, the replayed stages of a fork (texts tokenised
exactly, 2 positions per image), then the live iterations it may still run (instructions
tokenised, each text its max_tokens plus room for re-tokenisation and its markers).
"""

from __future__ import annotations

from dataclasses import dataclass

from strokes.model.network.config import BagelConfig
from strokes.model.spec.budget import generation_tokens, resumption
from strokes.model.spec.forks import Fork
from strokes.model.spec.params import GenerationParams, InvalidParams
from strokes.model.spec.prompts import GEN_THINK_SYSTEM_PROMPT, INTERLEAVED_PROMPT, render

IMAGE_ROPE = 2  # an image's VAE block and ViT block take one position each


@dataclass(frozen=True)
class Budget:
    cond: int  # tokens the conditional context (and its text-unconditional prefix) can reach
    img_uncond: int  # tokens the image-unconditional context can reach


def image_tokens(cfg: BagelConfig, width: int, height: int) -> tuple[int, int]:
    """(VAE block, ViT block) tokens of an image of this size once appended, markers included."""
    vae_w, vae_h = cfg.vae_transform.size(width, height)
    vit_w, vit_h = cfg.vit_transform.size(vae_w, vae_h)  # the ViT resize follows the VAE one
    patch = cfg.vit.patch_size
    return generation_tokens(cfg.geometry, vae_w, vae_h) + 2, (vit_h // patch) * (vit_w // patch) + 2


def _text(max_tokens: int) -> int:
    """Room for one decoded text: the decode itself, or its re-tokenised form, plus the markers."""
    return max_tokens + max_tokens // 8 + 16 + 2


def job_budget(cfg: BagelConfig, tokenize, params: GenerationParams) -> Budget:
    """Upper bounds for the job's caches; `tokenize(text) -> ids` is the engine's `segment`."""
    p = params
    shared = len(tokenize(GEN_THINK_SYSTEM_PROMPT)) if p.think else 0  # in cond and img_uncond
    cond = 0
    width, height = p.width, p.height
    if p.input_image is not None:
        width, height = cfg.vae_transform.size(p.input_image.shape[1], p.input_image.shape[0])
        cond += sum(image_tokens(cfg, width, height))
    image = sum(image_tokens(cfg, width, height))
    block = generation_tokens(cfg.geometry, width, height) + 2  # denoising room
    if p.protocol == "guided":
        first = len(tokenize(render("plan_first", p.prompt, p.templates)))
        later = len(tokenize(render("plan_next", p.prompt, p.templates)))
        reflect = len(tokenize(render("reflect", p.prompt, p.templates)))
        instructions = first + (p.max_iterations - 1) * later + p.max_iterations * reflect
        texts = p.max_iterations * (_text(p.plan.max_tokens) + _text(p.reflect.max_tokens))
        images = 2 * p.max_iterations * image
    else:
        instructions = len(tokenize(INTERLEAVED_PROMPT.replace("{prompt}", p.prompt)))
        longest = max(p.plan.max_tokens, p.reflect.max_tokens)
        texts = (2 * p.max_iterations + 1) * _text(longest)
        images = 2 * p.max_iterations * image
    cond += shared + instructions + texts + images + block
    return Budget(cond=cond, img_uncond=shared + instructions + block)


def _rope_text(max_tokens: int) -> int:
    """Positions of one decoded text: its tokens, re-tokenisation's few more, its markers."""
    return max_tokens + 16 + 2


def _live_positions(tokenize, p: GenerationParams, iterations: int, prompt: str) -> int:
    """Positions `iterations` live iterations toward `prompt` may add."""
    if p.protocol == "guided":
        plan = max(len(tokenize(render(name, prompt, p.templates))) for name in ("plan_first", "plan_next"))
        reflect = len(tokenize(render("reflect", prompt, p.templates)))
        per_iteration = plan + reflect + _rope_text(p.plan.max_tokens) + _rope_text(p.reflect.max_tokens)
        return iterations * (per_iteration + 2 * IMAGE_ROPE)
    user = len(tokenize(INTERLEAVED_PROMPT.replace("{prompt}", prompt)))
    longest = max(p.plan.max_tokens, p.reflect.max_tokens)
    return user + (3 * iterations + 1) * _rope_text(longest) + 2 * iterations * IMAGE_ROPE


def _replayed_positions(tokenize, p: GenerationParams, stages: list[dict]) -> int:
    """Positions the replay of recorded stages appends (the same items, tokenised the same way)."""
    positions = (
        len(tokenize(INTERLEAVED_PROMPT.replace("{prompt}", p.prompt))) if p.protocol != "guided" else 0
    )
    for stage in stages:
        if stage["stage"] == "instruction":
            positions += IMAGE_ROPE if stage.get("appended_image") else 0
            if p.protocol != "guided":
                positions += len(tokenize(INTERLEAVED_PROMPT.replace("{prompt}", stage["instruction"])))
            continue
        for key in ("instruction", "text"):
            if stage.get(key) is not None:
                positions += len(tokenize(stage[key]))
        if stage.get("image") and stage.get("appended_to_context"):
            positions += IMAGE_ROPE
    return positions


def rope_bound(tokenize, params: GenerationParams, fork: Fork | None) -> int:
    """The RoPE positions a run's context can reach; `tokenize(text) -> ids` is the engine's
    `segment` (markers included)."""
    p = params
    positions = len(tokenize(GEN_THINK_SYSTEM_PROMPT)) if p.think else 0
    positions += IMAGE_ROPE if p.input_image is not None else 0
    if fork is None or not fork.stages:
        return positions + _live_positions(tokenize, p, p.max_iterations, p.prompt)
    resumed = resumption(p, fork.stages, instruction=fork.instruction, input_image=False)
    positions += _replayed_positions(tokenize, p, fork.stages)
    if fork.instruction is not None:
        positions += IMAGE_ROPE  # the final image, when its stage left it out of the context
    return positions + _live_positions(tokenize, p, resumed.iterations, resumed.prompt)


def check_positions(cfg: BagelConfig, tokenize, params: GenerationParams, fork: Fork | None) -> int:
    """The run's RoPE bound, or InvalidParams (`max_positions`) when it passes the model's limit."""
    bound = rope_bound(tokenize, params, fork)
    limit = cfg.llm.max_position_embeddings
    if bound > limit:
        raise InvalidParams(
            "max_positions",
            f"the context could reach {bound:,} positions, past the model's limit of {limit:,} "
            "(max_position_embeddings); use fewer iterations, shorter texts or lower max_tokens",
        )
    return bound
