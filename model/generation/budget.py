"""How many tokens a job's contexts can reach, so its KV caches are allocated once, up front.

A cache that runs out of room doubles (model/network/kv_cache.py): a copy of everything so far, twice the
memory for a moment, and a new storage that the decode's CUDA graphs must be captured for again.
A job knows its bounds before it starts: the instructions it will append (tokenised exactly), the
text stages' max_tokens, the size of every image (VAE latents + ViT tokens), so the caches are
sized from them. Generated text is re-tokenised before it is appended, which can take a few more
tokens than were decoded: a margin of 1/8 + 16 per text stage covers it. An estimate that still
falls short is not an error, only a reallocation (`KVCache.reallocations`).
"""

from __future__ import annotations

from dataclasses import dataclass

from strokes.model.network.config import BagelConfig
from strokes.model.spec.budget import generation_tokens
from strokes.model.spec.params import GenerationParams
from strokes.model.spec.prompts import GEN_THINK_SYSTEM_PROMPT, INTERLEAVED_PROMPT, render


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
