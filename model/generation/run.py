"""One generation's state and the stages its protocols (model/generation/pipeline.py) are made of: a text
stage (an instruction, then the model's text), an image stage (a draft or a refinement under the
three guidance contexts), and a follow-up instruction after the final image.

Each stage yields its `model.spec.events`, counts its usage, and is recorded in the trajectory together
with the random generator's state after it and the contexts' boundary after it (model/generation/warm.py).
During a fork (model/spec/forks.py) a stage is not computed but replayed: the recorded text or image goes
into the contexts and the recorded generator state is restored, so what runs live afterwards is
exactly what the parent would have run.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from strokes.model.generation.budget import check_positions, job_budget
from strokes.model.generation.cancel import ShouldCancel
from strokes.model.generation.contexts import ContextItem, Contexts
from strokes.model.generation.engine import Engine
from strokes.model.generation.rng import rng_state, set_rng_state
from strokes.model.generation.sampler import sample_token
from strokes.model.generation.text_decoding import LogitsProcessor
from strokes.model.generation.trajectory import Trajectory
from strokes.model.generation.verdict import parse_reflection
from strokes.model.generation.warm import Boundary, WarmContexts
from strokes.model.spec.events import (
    Done,
    Event,
    ImageCompleted,
    ImageProgress,
    Stage,
    StageCompleted,
    StageStarted,
    TextDelta,
)
from strokes.model.spec.forks import IMAGE_STAGES, Fork
from strokes.model.spec.params import (
    GenerationParams,
    ImageSettings,
    InvalidParams,
    TextSettings,
    settings_dict,
)
from strokes.model.spec.prompts import GEN_THINK_SYSTEM_PROMPT


@dataclass
class _Replayed:
    """A recorded text standing in for a decoding during a fork's replay."""

    text: str
    stop_token: int | None
    ids: list[int] = field(default_factory=list)  # not recorded: logits processors see live tokens


class Run:
    """The state of one generation: contexts, randomness, trajectory, counters."""

    def __init__(
        self,
        engine: Engine,
        params: GenerationParams,
        should_cancel: ShouldCancel,
        logits_processor: LogitsProcessor | None,
        reuse_cache: bool,
        fork: Fork | None = None,
        warm: WarmContexts | None = None,
    ):
        self.engine, self.params, self.should_cancel = engine, params, should_cancel
        self.logits_processor, self.reuse_cache = logits_processor, reuse_cache
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(6), "little")
        self.generator = torch.Generator().manual_seed(seed)
        # Refused before any work when its context could pass the model's positions.
        check_positions(engine.cfg, engine.tokenizer.segment, params, fork)
        budget = job_budget(engine.cfg, engine.tokenizer.segment, params)
        hit = (
            warm.take(fork.stages, engine.device, budget)
            if (warm is not None and fork and fork.stages)
            else None
        )
        self.contexts = Contexts(engine, hit, budget)
        # The contexts after each stage, for model/generation/warm.py; those of stages served warm
        # come with it.
        self.boundaries: list[Boundary] = []
        self.warm_boundaries = hit.boundaries if hit else []
        self.trajectory = Trajectory(params, seed, parent=fork.lineage if fork else None)
        # A fork: stage records still to replay, their images, and a follow-up still to add.
        self.fork = fork or Fork([])
        self.replay: deque[dict] = deque(self.fork.stages)
        self.pending_instruction = self.fork.instruction
        self.last_pixels: np.ndarray | None = None  # the latest image, for a follow-up
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
    def start_context(self) -> None:
        if self.params.think:
            self.contexts.add(ContextItem("system", GEN_THINK_SYSTEM_PROMPT))
        if self.params.input_image is not None:
            image = self.engine.prepare_image(self.params.input_image)
            self.height, self.width = image.height, image.width  # outputs follow the starting image
            self.contexts.add(ContextItem("image", image=image), self.generator)

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

    def _record(self, **record) -> None:
        """A stage's trajectory record, with the RoPE positions the context holds after it (what
        prices a fork of it: model/spec/budget.py), and the contexts' boundary after it (for warm
        forks)."""
        if len(self.boundaries) < len(self.warm_boundaries):  # the caches are past this stage
            boundary = self.warm_boundaries[len(self.boundaries)]
        else:
            c = self.contexts
            logits = None if c.last_logits is None else c.last_logits.detach().to("cpu", copy=True)
            boundary = Boundary(
                (c.cond.length, c.cond.rope),
                (c.img_uncond.length, c.img_uncond.rope),
                (c.text_uncond.length, c.text_uncond.rope),
                len(c.items),
                logits,
            )
        self.trajectory.add(**record, positions=int(boundary.cond[1]))
        self.boundaries.append(boundary)

    def _next_replay(self, it: int, stage: str) -> dict | None:
        """The recorded stage to replay here, or None once the fork point is passed."""
        if not self.replay:
            return None
        rec = self.replay.popleft()
        if (rec["iteration"], rec["stage"]) != (it, stage):
            raise InvalidParams(
                "fork",
                f"the parent's trajectory does not follow its parameters: it recorded "
                f"{rec['iteration']}/{rec['stage']} where the protocol runs {it}/{stage}",
            )
        return rec

    def _lineage_flags(self, rec: dict | None) -> dict:
        if rec is None:
            return {}
        return {"inherited": True, "edited": True} if rec.get("edited") else {"inherited": True}

    # ---- stages --------------------------------------------------------------------------------
    def text_stage(
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
        rec = self._next_replay(it, stage.value)
        if rec is not None and rec.get("instruction") != instruction:
            raise InvalidParams("fork", f"the parent's {stage.value} instruction differs from its templates")
        if instruction is not None:
            self.contexts.add(ContextItem("user", instruction))
        if rec is not None:
            dec = self._replayed_text(rec)
        else:
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
        self.contexts.add(ContextItem("generated", dec.text))
        if rec is not None:
            set_rng_state(self.generator, rec["rng"])
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
            inherited=rec is not None,
        )
        self._account(done)
        self._record(
            iteration=it,
            stage=stage.value,
            instruction=instruction,
            text=dec.text,
            verdict=done.verdict.value if done.verdict else None,
            refine_instruction=done.refine_instruction,
            tokens=rec["tokens"] if rec else len(dec.ids),
            stop=rec["stop"] if rec else self._stop_reason(dec.stop_token),
            seconds=done.seconds,
            prefilled_tokens=done.prefilled_tokens,
            cached_tokens=cached,
            rng=rng_state(self.generator),
            **self._lineage_flags(rec),
        )
        done.trajectory = self.trajectory.to_dict(None, it, dict(self.usage))
        yield done
        return dec

    def _replayed_text(self, rec: dict) -> _Replayed:
        """A recorded text as a decoding. After an edited text the model chooses what follows (as
        after a text that ended with <|im_end|>); otherwise it does what it did in the parent."""
        tok = self.engine.tokenizer
        stop = {"eos": tok.eos_id, "image": tok.start_of_image, "max_tokens": None}[rec["stop"]]
        return _Replayed(rec["text"], tok.eos_id if rec.get("edited") else stop)

    def _stop_reason(self, token: int | None) -> str:
        if token is None:
            return "max_tokens"
        return "eos" if token == self.engine.tokenizer.eos_id else "image"

    def image_stage(self, it: int, stage: Stage, settings: ImageSettings, append: bool) -> Iterator[Event]:
        """Denoise an image on the three contexts; append it to the context if more stages follow."""
        yield StageStarted(it, stage)
        t0, cached = self._begin()
        c = self.contexts
        image_id = f"it{it}-{stage.value}"
        rec = self._next_replay(it, stage.value)
        if rec is not None:
            pixels = self.fork.images[rec["image"]]
            if pixels.shape != (self.height, self.width, 3) or bool(rec["appended_to_context"]) != append:
                raise InvalidParams("fork", f"the parent's image {rec['image']} does not fit its parameters")
        else:
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
            pixels = gen.pixels
        self.last_pixels = pixels
        yield ImageCompleted(it, stage, image_id, pixels, settings_dict(settings))
        rng_vae = None
        if append:
            if rec is not None:
                set_rng_state(self.generator, rec["rng_vae"])  # replay the parent's posterior draw
            rng_vae = rng_state(self.generator)
            self.contexts.add(
                ContextItem("image", image=Image.fromarray(pixels), resize=False), self.generator
            )
        if rec is not None:
            set_rng_state(self.generator, rec["rng"])
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
            inherited=rec is not None,
        )
        if rec is None:
            self.usage["denoising_steps"] += settings.steps - 1
            self.usage["model_forwards"] += gen.forwards
            self.usage["images"] += 1
        self._account(done)
        self._record(
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
            rng_vae=rng_vae,
            rng=rng_state(self.generator),
            **self._lineage_flags(rec),
        )
        done.trajectory = self.trajectory.to_dict(None, it, dict(self.usage))
        yield done
        return image_id

    def _account(self, done: StageCompleted) -> None:
        self.usage["prefilled_tokens"] += done.prefilled_tokens
        self.usage["cached_tokens"] += done.cached_tokens
        self.usage["generated_tokens"] += done.generated_tokens

    def finish(self, final_image_id: str | None, iterations: int) -> Done:
        record = self.trajectory.to_dict(final_image_id, iterations, dict(self.usage))
        return Done(final_image_id, iterations, record["seconds"], dict(self.usage), record)

    # ---- follow-ups (a fork that adds a user instruction after the final image) ----------------
    def follow_up_pending(self) -> bool:
        if self.replay:
            return self.replay[0]["stage"] == "instruction"
        return self.pending_instruction is not None

    def follow_up(self, it: int) -> str:
        """Put the final image in the context (where the last stage left it out) and return the new
        instruction; recorded as an "instruction" stage so a fork of this fork replays it."""
        rec = self.replay.popleft() if self.replay else None
        instruction = rec["instruction"] if rec else self.pending_instruction
        if rec is None:
            self.pending_instruction = None
        last = next(s for s in reversed(self.trajectory.stages) if s.get("image"))
        rng_vae, appended = None, None
        if not last["appended_to_context"]:
            if rec is not None:
                set_rng_state(self.generator, rec["rng_vae"])
            rng_vae, appended = rng_state(self.generator), last["image"]
            image = Image.fromarray(self.last_pixels)
            self.contexts.add(ContextItem("image", image=image, resize=False), self.generator)
        if rec is not None:
            set_rng_state(self.generator, rec["rng"])
        self._record(
            iteration=it + 1,
            stage="instruction",
            instruction=instruction,
            appended_image=appended,
            rng_vae=rng_vae,
            rng=rng_state(self.generator),
            **self._lineage_flags(rec),
        )
        return instruction

    # ---- the interleaved protocol's choice -----------------------------------------------------
    def choose(self, logits: torch.Tensor) -> int:
        """The model's next token after a finished text (or the prompt): image, text, or the end.
        While a fork replays, the parent's recorded next stage decides (its draws are restored)."""
        tok = self.engine.tokenizer
        if self.replay:
            kind = self.replay[0]["stage"]
            token = (
                tok.start_of_image
                if kind in IMAGE_STAGES
                else tok.eos_id
                if kind == "instruction"
                else tok.bos_id
            )
            self.history.append(token)
            return token
        if self.logits_processor is not None:
            logits = self.logits_processor(list(self.history), logits)
        s = self.params.plan
        token = sample_token(logits, s.do_sample, s.temperature, self.generator)
        self.history.append(token)
        return token
