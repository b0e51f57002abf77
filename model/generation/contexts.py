"""The three guidance contexts of one generation, filled with the official discipline.

The system prompt goes to cond and image-uncond; a user text goes to cond and image-uncond with
text-uncond snapshotted just before it; the model's own texts go to cond only; an image goes to
cond (clean VAE latents, then ViT tokens) with text-uncond snapshotted after it. Text-uncond is
therefore always a prefix of cond (it shares cond's memory); image-uncond has a cache of its own.
Every item added is kept, so the contexts can be rebuilt from scratch (the VAE posterior draws
replayed), and a warm start (model/generation/warm.py) begins with caches that already hold some items.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from PIL import Image

from strokes.model.generation.budget import Budget
from strokes.model.generation.engine import Engine
from strokes.model.generation.warm import Hit


@dataclass
class ContextItem:
    """Something added to the contexts, kept so that every context can be rebuilt from scratch."""

    kind: str  # "system" | "user" | "generated" | "image"
    text: str | None = None
    image: Image.Image | None = None
    resize: bool = True
    noise: torch.Tensor | None = None  # the VAE posterior draw, replayed on rebuild


class Contexts:
    """The three guidance contexts of one generation, filled with the official discipline."""

    def __init__(self, engine: Engine, warm: Hit | None = None, budget: Budget | None = None):
        self.engine = engine
        self.budget = budget  # the caches' sizes, once per job (model/generation/budget.py); None: defaults
        self.items: list[ContextItem] = []
        self.prefilled = 0  # tokens run into any cache by appends (rebuilds included)
        self.last_logits: torch.Tensor | None = None  # the model's prediction after the latest text
        self._ahead: deque[ContextItem] = (
            deque()
        )  # items a warm start already holds (model/generation/warm.py)
        if warm is None:
            self._fresh()
        else:
            self.cond, self.text_uncond, self.img_uncond = warm.cond, warm.text_uncond, warm.img_uncond
            self.items, self.last_logits = list(warm.items), warm.last_logits
            self._ahead = deque(warm.items)

    def _fresh(self) -> None:
        b = self.budget
        self.cond = self.engine.new_cache(b.cond) if b else self.engine.new_cache()
        self.img_uncond = self.engine.new_cache(b.img_uncond) if b else self.engine.new_cache()
        self.text_uncond = self.cond.snapshot()

    @property
    def cached_tokens(self) -> int:
        """Tokens already in the caches (text-uncond shares cond's memory)."""
        return self.cond.length + self.img_uncond.length

    def add(self, item: ContextItem, generator: torch.Generator | None = None) -> None:
        if self._ahead:  # a warm start: the caches hold this item already
            held = self._ahead.popleft()
            if (held.kind, held.text) != (item.kind, item.text):
                raise RuntimeError(f"warm context mismatch: holds {held.kind}, the replay adds {item.kind}")
            return
        self.items.append(item)
        self._apply(item, generator)

    def _apply(self, item: ContextItem, generator: torch.Generator | None = None) -> None:
        engine = self.engine
        if item.kind in ("system", "user"):
            if item.kind == "user":
                self.text_uncond = self.cond.snapshot()
            tokens = len(engine.tokenizer.segment(item.text))
            self.last_logits = engine.append_ids(self.cond, engine.tokenizer.segment(item.text))
            engine.append_ids(self.img_uncond, engine.tokenizer.segment(item.text))
            self.prefilled += 2 * tokens
        elif item.kind == "generated":
            tokens, self.last_logits = engine.append_generated_text(self.cond, item.text)
            self.prefilled += tokens
        elif item.kind == "image":
            vae = engine.append_vae_image(self.cond, item.image, item.noise, generator, resize=item.resize)
            item.noise = vae.noise
            vit = engine.append_vit_image(self.cond, item.image)
            self.text_uncond = self.cond.snapshot()
            self.prefilled += vae.tokens + vit.tokens
        else:
            raise ValueError(f"unknown context item {item.kind!r}")

    def rebuild(self) -> None:
        """Recompute every context from the items, replaying the recorded VAE posterior draws."""
        self._fresh()
        for item in self.items:
            self._apply(item)
