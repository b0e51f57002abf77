"""Process-driven generation: plan -> draft -> reflect -> refine, iteration after iteration, in
ONE growing context whose KV caches are reused from stage to stage.

The pipeline yields `model.events` and knows nothing of HTTP or Redis. Two protocols:

- `guided` (default; for the public BAGEL-7B-MoT, which was not trained for this loop): the
  pipeline drives the stages. It appends a stage instruction (model/prompts.py) as user text,
  decodes the plan, generates the draft, appends the draft, asks for and decodes the reflection,
  parses the verdict, and when it is not "correct" generates the refinement (an edit of the draft
  under BAGEL's edit guidance); then the next iteration, until "correct" or max_iterations.
- `interleaved` (for checkpoints fine-tuned in the paper's format): one user prompt; the model
  writes text, and when it asks for an image (<|vision_start|>, in a text or right after one) the
  pipeline generates it, appends it, and lets the model continue: after an image comes its
  inspection, then the model picks the next image, the next step, or the end. Stage labels: a text
  after an image is a reflection, any other text a plan; an image after <refine> is a refinement.

Contexts follow the official interleave_inference (BAGEL.md 2.5 and 10): the system prompt goes to
cond and image-uncond; a user text goes to cond and image-uncond with text-uncond snapshotted just
before it; the model's own texts go to cond only; an image goes to cond (clean VAE latents, then
ViT tokens) with text-uncond snapshotted after it. Text-uncond is therefore always a prefix of cond
(it shares cond's memory); image-uncond (texts only) has a cache of its own. One departure:
generated images re-enter the context at the size they were drawn, where the reference would first
run its input resize (a no-op from 512 to 1024 px, an upscale below 512).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from model.budget import Budget, job_budget
from model.engine import Cancelled, Engine, ShouldCancel
from model.events import (
    Done,
    Event,
    ImageCompleted,
    ImageProgress,
    IterationCompleted,
    Stage,
    StageCompleted,
    StageStarted,
    TextDelta,
    Verdict,
)
from model.params import GenerationParams, ImageSettings, TextSettings, settings_dict
from model.prompts import GEN_THINK_SYSTEM_PROMPT, INTERLEAVED_PROMPT, render
from model.sampler import sample_token
from model.trajectory import Trajectory
from model.verdict import parse_reflection

__all__ = ["Cancelled", "Contexts", "Pipeline"]

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


def _never() -> bool:
    return False


@dataclass
class _Item:
    """Something added to the contexts, kept so that every context can be rebuilt from scratch."""

    kind: str  # "system" | "user" | "generated" | "image"
    text: str | None = None
    image: Image.Image | None = None
    resize: bool = True
    noise: torch.Tensor | None = None  # the VAE posterior draw, replayed on rebuild


class Contexts:
    """The three guidance contexts of one generation, filled with the official discipline."""

    def __init__(self, engine: Engine, budget: Budget | None = None):
        self.engine = engine
        self.budget = budget  # the caches' sizes, once per job (model/budget.py); None: defaults
        self.items: list[_Item] = []
        self.prefilled = 0  # tokens run into any cache by appends (rebuilds included)
        self.last_logits: torch.Tensor | None = None  # the model's prediction after the latest text
        self._fresh()

    def _fresh(self) -> None:
        b = self.budget
        self.cond = self.engine.new_cache(b.cond) if b else self.engine.new_cache()
        self.img_uncond = self.engine.new_cache(b.img_uncond) if b else self.engine.new_cache()
        self.text_uncond = self.cond.snapshot()

    @property
    def cached_tokens(self) -> int:
        """Tokens already in the caches (text-uncond shares cond's memory)."""
        return self.cond.length + self.img_uncond.length

    def add(self, item: _Item, generator: torch.Generator | None = None) -> None:
        self.items.append(item)
        self._apply(item, generator)

    def _apply(self, item: _Item, generator: torch.Generator | None = None) -> None:
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


class Pipeline:
    def __init__(self, engine: Engine, *, reuse_cache: bool = True):
        self.engine = engine
        self.reuse_cache = reuse_cache  # False: rebuild every context before every stage (for tests)

    def run(
        self,
        params: GenerationParams,
        should_cancel: ShouldCancel = _never,
        logits_processor: LogitsProcessor | None = None,
    ) -> Iterator[Event]:
        """Yield the events of one generation. Raises `Cancelled` when should_cancel() turns True
        (checked between tokens and between denoising steps) and `InvalidParams` on bad input."""
        params.validate(max_side=self.engine.cfg.max_image_side)
        run = _Run(self.engine, params, should_cancel, logits_processor, self.reuse_cache)
        yield from run.guided() if params.protocol == "guided" else run.interleaved()


class _Run:
    """The state of one generation: contexts, randomness, trajectory, counters."""

    def __init__(
        self,
        engine: Engine,
        params: GenerationParams,
        should_cancel: ShouldCancel,
        logits_processor: LogitsProcessor | None,
        reuse_cache: bool,
    ):
        self.engine, self.params, self.should_cancel = engine, params, should_cancel
        self.logits_processor, self.reuse_cache = logits_processor, reuse_cache
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(6), "little")
        self.generator = torch.Generator().manual_seed(seed)
        self.contexts = Contexts(engine, job_budget(engine.cfg, engine.tokenizer.segment, params))
        self.trajectory = Trajectory(params, seed)
        self.height, self.width = params.height, params.width
        self.history: list[int] = []  # every token the model chose, for logits processors
        self.reported_prefill = 0
        self.usage = {
            "prefilled_tokens": 0,
            "cached_tokens": 0,
            "generated_tokens": 0,
            "denoising_steps": 0,
            "model_forwards": 0,
            "images": 0,
        }

    # ---- shared pieces -------------------------------------------------------------------------
    def _start_context(self) -> None:
        if self.params.think:
            self.contexts.add(_Item("system", GEN_THINK_SYSTEM_PROMPT))
        if self.params.input_image is not None:
            image = self.engine.prepare_image(self.params.input_image)
            self.height, self.width = image.height, image.width  # outputs follow the starting image
            self.contexts.add(_Item("image", image=image), self.generator)

    def _begin(self) -> tuple[float, int]:
        """Stage start: (time, tokens served from the caches). Prefills not yet reported by a stage
        (the system prompt, say) belong to this stage, not to the cache it starts from."""
        unreported = self.contexts.prefilled - self.reported_prefill
        cached = self.contexts.cached_tokens - unreported
        if not self.reuse_cache:
            self.contexts.rebuild()
            cached = 0
        return time.perf_counter(), cached

    def _prefilled(self) -> int:
        """Tokens prefilled since the last stage ended (rebuilds included)."""
        tokens = self.contexts.prefilled - self.reported_prefill
        self.reported_prefill = self.contexts.prefilled
        return tokens

    def _processor(self) -> LogitsProcessor | None:
        if self.logits_processor is None:
            return None
        return lambda ids, logits: self.logits_processor(self.history + ids, logits)

    def _text_stage(
        self,
        it: int,
        stage: Stage,
        instruction: str | None,
        settings: TextSettings,
        stop_ids: tuple[int, ...] | None = None,
    ) -> Iterator[Event]:
        """Add the instruction (if any), decode the model's text, append it. Returns the decoding."""
        yield StageStarted(it, stage)
        t0, cached = self._begin()
        if instruction is not None:
            self.contexts.add(_Item("user", instruction))
        dec = self.engine.decode_text(
            self.contexts.cond,
            max_tokens=settings.max_tokens,
            do_sample=settings.do_sample,
            temperature=settings.temperature,
            generator=self.generator,
            stop_ids=stop_ids,
            should_cancel=self.should_cancel,
            logits_processor=self._processor(),
            commit=False,
        )
        for step in dec:
            if step.delta:
                yield TextDelta(it, stage, step.delta)
        self.history += dec.ids
        self.contexts.add(_Item("generated", dec.text))
        reflection = parse_reflection(dec.text) if stage == Stage.reflect else None
        done = StageCompleted(
            it,
            stage,
            seconds=round(time.perf_counter() - t0, 4),
            prefilled_tokens=self._prefilled(),
            cached_tokens=cached,
            text=dec.text,
            verdict=reflection.verdict if reflection else None,
            refine_instruction=reflection.refine_instruction if reflection else None,
            generated_tokens=len(dec.ids),
        )
        self._account(done)
        self.trajectory.add(
            iteration=it,
            stage=stage.value,
            instruction=instruction,
            text=dec.text,
            verdict=done.verdict.value if done.verdict else None,
            refine_instruction=done.refine_instruction,
            tokens=len(dec.ids),
            stop=self._stop_reason(dec.stop_token),
            seconds=done.seconds,
            prefilled_tokens=done.prefilled_tokens,
            cached_tokens=cached,
        )
        yield done
        return dec

    def _stop_reason(self, token: int | None) -> str:
        if token is None:
            return "max_tokens"
        return "eos" if token == self.engine.tokenizer.eos_id else "image"

    def _image_stage(self, it: int, stage: Stage, settings: ImageSettings, append: bool) -> Iterator[Event]:
        """Denoise an image on the three contexts; append it to the context if more stages follow."""
        yield StageStarted(it, stage)
        t0, cached = self._begin()
        c = self.contexts
        gen = self.engine.generate_image(
            c.cond,
            c.text_uncond,
            c.img_uncond,
            height=self.height,
            width=self.width,
            settings=settings,
            generator=self.generator,
            should_cancel=self.should_cancel,
            preview_every=self.params.preview_every,
        )
        for step in gen:
            yield ImageProgress(it, stage, step.index + 1, step.total, step.preview)
        image_id = f"it{it}-{stage.value}"
        yield ImageCompleted(it, stage, image_id, gen.pixels, settings_dict(settings))
        if append:
            self.contexts.add(_Item("image", image=Image.fromarray(gen.pixels), resize=False), self.generator)
        done = StageCompleted(
            it,
            stage,
            seconds=round(time.perf_counter() - t0, 4),
            prefilled_tokens=self._prefilled(),
            cached_tokens=cached,
            image_id=image_id,
            width=self.width,
            height=self.height,
            steps=settings.steps - 1,  # denoising steps run: the count image.progress reports
        )
        self.usage["denoising_steps"] += done.steps
        self.usage["model_forwards"] += gen.forwards
        self.usage["images"] += 1
        self._account(done)
        self.trajectory.add(
            iteration=it,
            stage=stage.value,
            image=image_id,
            width=self.width,
            height=self.height,
            settings=settings_dict(settings),
            appended_to_context=append,
            seconds=done.seconds,
            prefilled_tokens=done.prefilled_tokens,
            cached_tokens=cached,
        )
        yield done
        return image_id

    def _account(self, done: StageCompleted) -> None:
        self.usage["prefilled_tokens"] += done.prefilled_tokens
        self.usage["cached_tokens"] += done.cached_tokens
        self.usage["generated_tokens"] += done.generated_tokens

    def _done(self, final_image_id: str | None, iterations: int) -> Done:
        record = self.trajectory.to_dict(final_image_id, iterations, dict(self.usage))
        return Done(final_image_id, iterations, record["seconds"], dict(self.usage), record)

    # ---- the guided protocol -------------------------------------------------------------------
    def guided(self) -> Iterator[Event]:
        p = self.params
        self._start_context()
        final_id, it = None, 0
        for it in range(1, p.max_iterations + 1):
            last = it == p.max_iterations
            plan_template = "plan_first" if it == 1 else "plan_next"
            yield from self._text_stage(it, Stage.plan, render(plan_template, p.prompt, p.templates), p.plan)
            final_id = yield from self._image_stage(it, Stage.draft, p.draft, append=True)
            reflection = yield from self._text_stage(
                it, Stage.reflect, render("reflect", p.prompt, p.templates), p.reflect
            )
            verdict = parse_reflection(reflection.text).verdict
            if verdict != Verdict.correct:
                final_id = yield from self._image_stage(it, Stage.refine, p.refine, append=not last)
            yield IterationCompleted(it, verdict, final_id)
            if verdict == Verdict.correct:
                break
        yield self._done(final_id, it)

    # ---- the interleaved protocol --------------------------------------------------------------
    def _choose(self, logits: torch.Tensor) -> int:
        """The model's next token after a finished text (or the prompt): image, text, or the end."""
        if self.logits_processor is not None:
            logits = self.logits_processor(list(self.history), logits)
        s = self.params.plan
        token = sample_token(logits, s.do_sample, s.temperature, self.generator)
        self.history.append(token)
        return token

    def interleaved(self) -> Iterator[Event]:
        p, tok = self.params, self.engine.tokenizer
        self._start_context()
        self.contexts.add(_Item("user", INTERLEAVED_PROMPT.replace("{prompt}", p.prompt)))
        it, images, last_kind = 0, 0, None
        final_id, verdict, refine_next = None, Verdict.unknown, False
        next_token = self._choose(self.contexts.last_logits)
        while True:
            if next_token == tok.bos_id:  # a text segment
                stage = Stage.reflect if last_kind == "image" else Stage.plan
                if stage == Stage.plan:
                    if it and final_id:
                        yield IterationCompleted(it, verdict, final_id)
                    if it == p.max_iterations:
                        break
                    it += 1
                settings = p.reflect if stage == Stage.reflect else p.plan
                dec = yield from self._text_stage(
                    it, stage, None, settings, stop_ids=(tok.eos_id, tok.start_of_image)
                )
                last_kind = "text"
                refine_next = "<refine" in dec.text.lower()
                if stage == Stage.reflect:
                    verdict = parse_reflection(dec.text).verdict
                next_token = (
                    tok.start_of_image
                    if dec.stop_token == tok.start_of_image
                    else self._choose(self.contexts.last_logits)
                )
            elif next_token == tok.start_of_image:  # the model asks for an image
                if images == 2 * p.max_iterations:
                    break
                it = max(it, 1)
                stage = Stage.refine if refine_next else Stage.draft
                final_id = yield from self._image_stage(
                    it, stage, p.refine if refine_next else p.draft, append=True
                )
                images, last_kind, refine_next = images + 1, "image", False
                next_token = tok.bos_id  # every image is followed by its inspection
            else:  # end of sequence (or anything else): the model is done
                break
        if it and final_id:
            yield IterationCompleted(it, verdict, final_id)
        yield self._done(final_id, it)
