"""BAGEL's one-shot tasks on the engine: text to image, image editing, understanding, each with
optional think mode; the sequences of the official InterleaveInferencer (BAGEL.md 2.5 a-f).

Each call builds fresh contexts with the pipeline's `Contexts` (the same discipline), so these are
the building blocks of the process loop run once, not a second implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from strokes.model.generation.contexts import ContextItem, Contexts
from strokes.model.generation.engine import Engine
from strokes.model.spec.params import DRAFT_DEFAULTS, REFINE_DEFAULTS, ImageSettings, TextSettings
from strokes.model.spec.prompts import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT


@dataclass
class TaskResult:
    image: np.ndarray | None = None  # (H, W, 3) uint8
    text: str | None = None  # the thinking (generation) or the answer (understanding)


def _decode(engine: Engine, ctx: Contexts, settings: TextSettings, generator: torch.Generator) -> str:
    dec = engine.decode_text(
        ctx.cond,
        max_tokens=settings.max_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature,
        generator=generator,
        commit=False,
    )
    for _ in dec:
        pass
    return dec.text


def _think(engine: Engine, ctx: Contexts, settings: TextSettings, generator: torch.Generator) -> str:
    text = _decode(engine, ctx, settings, generator)
    ctx.add(ContextItem("generated", text))  # thinking goes to cond only
    return text


def _draw(
    engine: Engine,
    ctx: Contexts,
    height: int,
    width: int,
    settings: ImageSettings,
    generator: torch.Generator,
) -> np.ndarray:
    gen = engine.generate_image(
        ctx.cond,
        ctx.text_uncond,
        ctx.img_uncond,
        height=height,
        width=width,
        settings=settings,
        generator=generator,
    )
    for _ in gen:
        pass
    return gen.pixels


def text_to_image(
    engine: Engine,
    prompt: str,
    *,
    height: int = 1024,
    width: int = 1024,
    settings: ImageSettings = DRAFT_DEFAULTS,
    think: bool = False,
    think_settings: TextSettings = TextSettings(max_tokens=1000),
    seed: int = 0,
) -> TaskResult:
    generator = torch.Generator().manual_seed(seed)
    ctx = Contexts(engine)
    if think:
        ctx.add(ContextItem("system", GEN_THINK_SYSTEM_PROMPT))
    ctx.add(ContextItem("user", prompt))
    thought = _think(engine, ctx, think_settings, generator) if think else None
    return TaskResult(_draw(engine, ctx, height, width, settings, generator), thought)


def edit_image(
    engine: Engine,
    image: Image.Image | np.ndarray,
    instruction: str,
    *,
    settings: ImageSettings = REFINE_DEFAULTS,
    think: bool = False,
    think_settings: TextSettings = TextSettings(max_tokens=1000),
    seed: int = 0,
) -> TaskResult:
    """The output has the input's size after BAGEL's VAE resize."""
    generator = torch.Generator().manual_seed(seed)
    ctx = Contexts(engine)
    if think:
        ctx.add(ContextItem("system", GEN_THINK_SYSTEM_PROMPT))
    prepared = engine.prepare_image(image)
    ctx.add(ContextItem("image", image=prepared), generator)  # posterior draw first, as the reference
    ctx.add(ContextItem("user", instruction))
    thought = _think(engine, ctx, think_settings, generator) if think else None
    return TaskResult(_draw(engine, ctx, prepared.height, prepared.width, settings, generator), thought)


def understand(
    engine: Engine,
    image: Image.Image | np.ndarray,
    question: str,
    *,
    think: bool = False,
    settings: TextSettings = TextSettings(max_tokens=512),
    seed: int = 0,
) -> TaskResult:
    """Answer a question about an image (ViT tokens only, no VAE, as the reference)."""
    generator = torch.Generator().manual_seed(seed)
    ctx = Contexts(engine)
    if think:
        ctx.add(ContextItem("system", VLM_THINK_SYSTEM_PROMPT))
    prepared = engine.prepare_image(image)
    engine.append_vit_image(ctx.cond, prepared)
    ctx.add(ContextItem("user", question))
    return TaskResult(text=_decode(engine, ctx, settings, generator))
