"""Scripted pipelines: the worker's Pipeline protocol (service/worker/runner.py) with a course the
test knows, for in-process workers and for worker processes started with
`strokes worker --pipeline testkit.pipelines:NAME` (the factories at the end take the worker's
ModelSpec; the test puts tests/ on the child's PYTHONPATH, as testkit.processes.env_with does)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from strokes.model.spec.events import (
    Done,
    ImageCompleted,
    ImageProgress,
    IterationCompleted,
    Stage,
    StageCompleted,
    StageStarted,
    TextDelta,
    Verdict,
)
from strokes.model.spec.params import GenerationParams, RunOptions
from strokes.service.worker.main import ModelSpec


class ScriptedCancel(Exception):
    """What the scripted pipeline raises when should_cancel() turns true (like model's Cancelled)."""


@dataclass
class ScriptedPipeline:
    """Emits a guided trajectory's events like the real pipeline: `steps` denoising steps per image,
    `step_s` seconds each; `fail` raises on every run (a poison job). Counts steps run after a
    cancel request to check that it stops within one step. Keeps no warm contexts."""

    steps: int = 5
    step_s: float = 0.0
    iterations: int = 1
    fail: bool = False
    runs: int = 0
    steps_after_cancel: list[int] = field(default_factory=list)

    def run(
        self, params: GenerationParams, should_cancel: Callable[[], bool], options: RunOptions = RunOptions()
    ) -> Iterator:
        self.runs += 1
        after = 0
        self.steps_after_cancel.append(0)
        h, w = params.height, params.width
        for it in range(1, self.iterations + 1):
            for stage in (Stage.plan, Stage.draft, Stage.reflect, Stage.refine):
                yield StageStarted(it, stage)
                if stage in (Stage.plan, Stage.reflect):
                    for token in ("step ", "one"):
                        if should_cancel():
                            raise ScriptedCancel()
                        yield TextDelta(it, stage, token)
                    verdict = Verdict.wrong if stage == Stage.reflect else None
                    yield StageCompleted(
                        it, stage, 0.01, 5, 3, text="step one", verdict=verdict, generated_tokens=2
                    )
                    continue
                for step in range(1, self.steps + 1):
                    if should_cancel():
                        raise ScriptedCancel()
                    if self.fail:
                        raise RuntimeError("poisoned input")
                    time.sleep(self.step_s)
                    yield ImageProgress(it, stage, step, self.steps)
                    if should_cancel():
                        after += 1
                        self.steps_after_cancel[-1] = after
                image_id = f"it{it}-{stage.value}"
                yield ImageCompleted(it, stage, image_id, np.full((h, w, 3), 40 * it, np.uint8))
                yield StageCompleted(
                    it,
                    stage,
                    self.steps * self.step_s,
                    4,
                    8,
                    image_id=image_id,
                    width=w,
                    height=h,
                    steps=self.steps,
                )
            yield IterationCompleted(it, Verdict.wrong, f"it{it}-refine")
        yield Done(
            f"it{self.iterations}-refine",
            self.iterations,
            0.1,
            {"generated_tokens": 4 * self.iterations},
            {"version": 1, "prompt": params.prompt},
        )

    def holds_warm(self, key: str) -> bool:
        return False


class LongStepPipeline:
    """A pipeline whose first image step does not return for a minute and does not look at
    should_cancel meanwhile, like a VAE decode of a large image."""

    def run(
        self, params: GenerationParams, should_cancel: Callable[[], bool], options: RunOptions = RunOptions()
    ) -> Iterator:
        yield StageStarted(1, Stage.draft)
        yield ImageProgress(1, Stage.draft, 1, 2)
        time.sleep(60)  # the long step itself: the worker must not wait for it on SIGTERM
        yield ImageProgress(1, Stage.draft, 2, 2)

    def holds_warm(self, key: str) -> bool:
        return False


class DeviceErrorPipeline(ScriptedPipeline):
    """ScriptedPipeline, except that the prompt "device error" breaks the (pretend) device."""

    def run(
        self, params: GenerationParams, should_cancel: Callable[[], bool], options: RunOptions = RunOptions()
    ) -> Iterator:
        if params.prompt == "device error":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield from super().run(params, should_cancel, options)


class PacedPipeline(ScriptedPipeline):
    """ScriptedPipeline whose images take the request's own draft steps (`step_s` each): each job
    says how long it runs (the failover drill runs long jobs and quick probes side by side)."""

    def run(
        self, params: GenerationParams, should_cancel: Callable[[], bool], options: RunOptions = RunOptions()
    ) -> Iterator:
        self.steps = params.draft.steps
        yield from super().run(params, should_cancel, options)


# ---- factories for `strokes worker --pipeline testkit.pipelines:NAME` ------------------------------


def long_step_pipeline(model: ModelSpec) -> LongStepPipeline:
    return LongStepPipeline()


def device_error_pipeline(model: ModelSpec) -> DeviceErrorPipeline:
    return DeviceErrorPipeline(steps=2)


def two_refined_iterations(model: ModelSpec) -> ScriptedPipeline:
    """plan, draft, reflect (wrong), refine, twice: four images, the last one final (the tiny
    model's reflections are noise, so a test that needs a known course uses this)."""
    return ScriptedPipeline(steps=2, iterations=2)


def paced_pipeline(model: ModelSpec) -> PacedPipeline:
    """A job of draft steps N runs two images of N steps of 0.05 s (plus its texts)."""
    return PacedPipeline(step_s=0.05)
