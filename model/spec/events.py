"""Typed events of a process-driven generation, as the pipeline yields them.

The pipeline yields these and never does I/O; transport (SSE, Redis, a terminal) is the caller's
business. Every event has a wire `name` (the SSE `event:` field) and `payload()`, a JSON-ready dict.
Image pixels travel only in `ImageCompleted.pixels` (uint8 H x W x 3); the caller stores them and
refers to them by `image_id` afterwards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, ClassVar

import numpy as np


class Stage(str, Enum):
    """The four stages of one iteration (DESIGN.md section 1)."""

    plan = "plan"
    draft = "draft"
    reflect = "reflect"
    refine = "refine"


class Verdict(str, Enum):
    """What the reflection concluded about the latest image."""

    correct = "correct"
    wrong = "wrong"
    unknown = "unknown"  # neither keyword found: treated as wrong, but reported honestly


@dataclass
class Event:
    name: ClassVar[str] = "event"

    def payload(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Enum):
                out[key] = value.value
        return out


@dataclass
class StageStarted(Event):
    name: ClassVar[str] = "stage.started"
    iteration: int
    stage: Stage


@dataclass
class TextDelta(Event):
    name: ClassVar[str] = "text.delta"
    iteration: int
    stage: Stage
    delta: str


@dataclass
class ImageProgress(Event):
    """Denoising step `step` of `steps` finished (1-based; `steps` is the request's steps - 1, the
    same count as StageCompleted.steps). `preview` is a small uint8 image or None."""

    name: ClassVar[str] = "image.progress"
    iteration: int
    stage: Stage
    step: int
    steps: int
    preview: np.ndarray | None = field(default=None, repr=False)

    def payload(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "stage": self.stage.value,
            "step": self.step,
            "steps": self.steps,
        }


@dataclass
class ImageCompleted(Event):
    """A finished image. The caller stores `pixels` under `image_id`; later events refer to the id."""

    name: ClassVar[str] = "image.completed"
    iteration: int
    stage: Stage
    image_id: str
    pixels: np.ndarray = field(repr=False)  # (H, W, 3) uint8
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    def payload(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "stage": self.stage.value,
            "image_id": self.image_id,
            "width": self.width,
            "height": self.height,
            "settings": self.settings,
        }


@dataclass
class StageCompleted(Event):
    """A stage ended. Text stages carry `text` (and reflections a `verdict`); image stages `image_id`.

    `prefilled_tokens` were computed into the KV cache by this stage; `cached_tokens` were already
    there and served from it (the reuse that one growing context buys). `steps` (image stages) is
    the number of denoising steps run, the `steps` of this stage's ImageProgress events: one less
    than the request's `steps`, which counts the timesteps of the schedule (BAGEL's num_timesteps).
    """

    name: ClassVar[str] = "stage.completed"
    iteration: int
    stage: Stage
    seconds: float
    prefilled_tokens: int
    cached_tokens: int
    text: str | None = None
    verdict: Verdict | None = None
    refine_instruction: str | None = None
    generated_tokens: int = 0
    image_id: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    inherited: bool = False  # replayed from a fork's parent (model/spec/forks.py), not computed anew
    # The trajectory record so far (model/generation/trajectory.py): what a fork of the unfinished run needs.
    trajectory: dict[str, Any] | None = field(default=None, repr=False)

    def payload(self) -> dict[str, Any]:
        out = super().payload()
        out.pop("trajectory", None)
        return out


@dataclass
class IterationCompleted(Event):
    name: ClassVar[str] = "iteration.completed"
    iteration: int
    verdict: Verdict
    image_id: str  # the iteration's final image (the refinement if there was one, else the draft)


# A generation in which the model drew no image (the interleaved protocol lets the model stop
# whenever it likes) is a failure: `strokes generate` exits 1, the API's job ends job.failed with
# error {type: "no_image", message: NO_IMAGE_MESSAGE}.
NO_IMAGE_MESSAGE = "the model ended the generation without drawing an image"


@dataclass
class Paused(Event):
    """The run stopped after a stage the caller asked to pause after (`pause_after`). `trajectory`
    is the record so far; continuing is a fork of it at this stage (model/spec/forks.py), with
    the stage's text as it is or replaced. Nothing follows this event."""

    name: ClassVar[str] = "paused"
    iteration: int
    stage: Stage
    text: str | None
    trajectory: dict[str, Any] = field(repr=False)

    def payload(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "stage": self.stage.value, "text": self.text}


@dataclass
class Done(Event):
    """The generation finished. `trajectory` is the JSON record of every stage (see trajectory.py)."""

    name: ClassVar[str] = "done"
    final_image_id: str | None  # None: the model ended without drawing (NO_IMAGE_MESSAGE)
    iterations: int
    seconds: float
    usage: dict[str, int]
    trajectory: dict[str, Any] = field(repr=False)
