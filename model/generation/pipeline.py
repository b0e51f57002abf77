"""Process-driven generation: plan -> draft -> reflect -> refine, iteration after iteration, in
ONE growing context whose KV caches are reused from stage to stage.

The pipeline yields `model.spec.events` and knows nothing of HTTP or Redis. Two protocols:

- `guided` (default; for the public BAGEL-7B-MoT, which was not trained for this loop): the
  pipeline drives the stages. It appends a stage instruction (model/spec/prompts.py) as user text,
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
run its input resize (a no-op from 512 to 1024 px, an upscale below 512). model/generation/contexts.py holds
the contexts; model/generation/run.py holds one generation's state and the stages both protocols are made of.

Steering (docs/steering.md): a run may start from a recorded stage boundary of another (`fork`,
model/spec/forks.py: the recorded stages are replayed into the contexts, then the protocol runs on),
stop after chosen stages (`pause_after`: a `Paused` event), and keep its caches warm for later
forks (model/generation/warm.py). Every stage records the random generator's state after it, which is what
makes a replay exact.
"""

from __future__ import annotations

from collections.abc import Iterator

from strokes.model.generation.cancel import ShouldCancel, never
from strokes.model.generation.contexts import ContextItem
from strokes.model.generation.engine import Engine
from strokes.model.generation.run import Run
from strokes.model.generation.verdict import parse_reflection
from strokes.model.generation.warm import WarmContexts
from strokes.model.spec.events import Done, Event, IterationCompleted, Paused, Stage, StageCompleted, Verdict
from strokes.model.spec.params import GenerationParams, RunOptions
from strokes.model.spec.prompts import INTERLEAVED_PROMPT, render


class Pipeline:
    def __init__(self, engine: Engine, *, reuse_cache: bool = True, warm: WarmContexts | None = None):
        self.engine = engine
        self.reuse_cache = reuse_cache  # False: rebuild every context before every stage (for tests)
        self.warm = (
            warm  # keeps the contexts of paused and finished runs for forks (model/generation/warm.py)
        )

    def run(
        self,
        params: GenerationParams,
        should_cancel: ShouldCancel = never,
        options: RunOptions = RunOptions(),
    ) -> Iterator[Event]:
        """Yield the events of one generation. Raises `Cancelled` when should_cancel() turns True
        (checked between tokens and between denoising steps) and `InvalidParams` on bad input.

        With `options.fork` (model/spec/forks.py; `params` must be the parent's), the recorded stages
        are replayed into the contexts (events marked `inherited`, nothing decoded or denoised) and
        the protocol runs on live from the fork point. With `options.pause_after` (stage names: plan,
        reflect), the run ends with a `Paused` event after the first such stage it computes (replayed
        ones excepted). With a `warm` store and `options.warm_key`, a fork starts from warm caches
        where it can, and the run's contexts are kept under `warm_key` when it pauses or finishes."""
        params.validate(max_side=self.engine.cfg.max_image_side)
        warm = self.warm if self.reuse_cache else None
        key = options.warm_key if warm is not None else None
        run = Run(
            self.engine, params, should_cancel, options.logits_processor, self.reuse_cache, options.fork, warm
        )
        protocol = guided(run) if params.protocol == "guided" else interleaved(run)
        for event in protocol:
            if isinstance(event, Done) and key:
                warm.put(key, run.trajectory.stages, run.boundaries, run.contexts)
            yield event
            if (
                isinstance(event, StageCompleted)
                and not event.inherited
                and event.stage.value in options.pause_after
            ):
                if key:
                    warm.put(key, run.trajectory.stages, run.boundaries, run.contexts)
                yield Paused(event.iteration, event.stage, event.text, event.trajectory)
                return

    def holds_warm(self, key: str) -> bool:
        """Whether the contexts of the run kept under `key` are still warm here."""
        return self.warm is not None and self.warm.holds(key)


# ---- the guided protocol -----------------------------------------------------------------------


def guided(run: Run) -> Iterator[Event]:
    """The pipeline drives the stages: plan, draft, reflect, then refine unless correct."""
    run.start_context()
    final_id, it = yield from _guided_rounds(run, 1, run.params.prompt, "plan_first")
    while run.follow_up_pending():
        instruction = run.follow_up(it)
        final_id, it = yield from _guided_rounds(run, it + 1, instruction, "plan_next")
    yield run.finish(final_id, it)


def _guided_rounds(run: Run, first: int, prompt: str, first_template: str) -> Iterator[Event]:
    """Iterations first .. first + max_iterations - 1 toward `prompt`, until one is correct."""
    p = run.params
    final_id, it, end = None, first, first + p.max_iterations - 1
    for it in range(first, end + 1):
        last = it == end
        plan_template = first_template if it == first else "plan_next"
        yield from run.text_stage(it, Stage.plan, render(plan_template, prompt, p.templates), p.plan)
        final_id = yield from run.image_stage(it, Stage.draft, p.draft, append=True)
        reflection = yield from run.text_stage(
            it, Stage.reflect, render("reflect", prompt, p.templates), p.reflect
        )
        verdict = parse_reflection(reflection.text).verdict
        if verdict != Verdict.correct:
            final_id = yield from run.image_stage(it, Stage.refine, p.refine, append=not last)
        yield IterationCompleted(it, verdict, final_id)
        if verdict == Verdict.correct:
            break
    return final_id, it


# ---- the interleaved protocol ------------------------------------------------------------------


def interleaved(run: Run) -> Iterator[Event]:
    """The model drives: one user prompt, then texts and the images it asks for."""
    run.start_context()
    final_id, it = yield from _interleaved_rounds(run, 0, run.params.prompt)
    while run.follow_up_pending():
        instruction = run.follow_up(it)
        new_id, it = yield from _interleaved_rounds(run, it, instruction)
        final_id = new_id or final_id
    yield run.finish(final_id, it)


def _interleaved_rounds(run: Run, first: int, prompt: str) -> Iterator[Event]:
    """The model's own loop after the user text for `prompt`, at most max_iterations plans and
    2 * max_iterations images, iterations numbered after `first`."""
    p, tok = run.params, run.engine.tokenizer
    run.contexts.add(ContextItem("user", INTERLEAVED_PROMPT.replace("{prompt}", prompt)))
    it, images, last_kind = first, 0, None
    final_id, verdict, refine_next = None, Verdict.unknown, False
    next_token = run.choose(run.contexts.last_logits)
    while True:
        if next_token == tok.bos_id:  # a text segment
            stage = Stage.reflect if last_kind == "image" else Stage.plan
            if stage == Stage.plan:
                if it > first and final_id:
                    yield IterationCompleted(it, verdict, final_id)
                if it == first + p.max_iterations:
                    break
                it += 1
            settings = p.reflect if stage == Stage.reflect else p.plan
            dec = yield from run.text_stage(
                it, stage, None, settings, stop_ids=(tok.eos_id, tok.start_of_image)
            )
            last_kind = "text"
            refine_next = "<refine" in dec.text.lower()
            if stage == Stage.reflect:
                verdict = parse_reflection(dec.text).verdict
            next_token = (
                tok.start_of_image
                if dec.stop_token == tok.start_of_image
                else run.choose(run.contexts.last_logits)
            )
        elif next_token == tok.start_of_image:  # the model asks for an image
            if images == 2 * p.max_iterations:
                break
            it = max(it, first + 1)
            stage = Stage.refine if refine_next else Stage.draft
            final_id = yield from run.image_stage(
                it, stage, p.refine if refine_next else p.draft, append=True
            )
            images, last_kind, refine_next = images + 1, "image", False
            next_token = tok.bos_id  # every image is followed by its inspection
        else:  # end of sequence (or anything else): the model is done
            break
    if it > first and final_id:
        yield IterationCompleted(it, verdict, final_id)
    return final_id, it
