"""Forks and resumes: a new generation that starts from a completed stage boundary of a recorded one.

Every stage of a trajectory (model/generation/trajectory.py) records what the context needs to be rebuilt
exactly: its instruction and text (text stages), its image file (image stages), and the state of
the run's one random generator after the stage (`rng`) and, for an image that went back into the
context, just before its VAE posterior draw (`rng_vae`). A fork replays the parent's stages up to
the fork point through the pipeline's own append path (same items, same order, same shapes), so
the rebuilt KV caches, the replayed VAE draws and the generator state equal the parent's bitwise
on the same device and dtype; then the protocol runs on live from there.

A fork point is either a stage (`iteration`, `stage`), optionally replacing that stage's text
(`text`: a plan, a reflection, a follow-up instruction; image stages take none), or the end of the
parent with a follow-up user instruction (`instruction`: "now make the cube green"), which puts the
final image in the context and runs new iterations toward the instruction. A resume after a pause is
the same thing: a fork of the job's own trajectory so far at its last stage.

Bad fork points raise `InvalidParams` naming the field (`fork.stage`, `fork.text`, ...), so the
service answers a 422 and the CLI a one-line error. This module knows nothing of HTTP or Redis.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from strokes.model.spec.params import (
    GenerationParams,
    ImageSettings,
    InvalidParams,
    TextSettings,
)

# Stage kinds whose text a caller may replace: the model's plans and reflections, and follow-up
# instructions (a "instruction" record, written when a fork adds one after a final image).
TEXT_STAGES = ("plan", "reflect", "instruction")
IMAGE_STAGES = ("draft", "refine")
MAX_EDIT_CHARS = 4000
# Chat-template control tokens (`<|im_end|>`, `<|vision_start|>`, ...): an edit is appended as the
# model's own text, whose control tokens stay control tokens, so a typed one is refused outright.
CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>")


def check_edit(text: str, field_name: str) -> str:
    """A caller's replacement text: non-blank, bounded, no control tokens. Raises InvalidParams."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidParams(field_name, "must not be blank")
    if len(text) > MAX_EDIT_CHARS:
        raise InvalidParams(field_name, f"must be at most {MAX_EDIT_CHARS} characters")
    if "\x00" in text:
        raise InvalidParams(field_name, "must not contain NUL characters")
    match = CONTROL_TOKEN.search(text)
    if match:
        raise InvalidParams(field_name, f"contains the reserved token string {match.group(0)!r}")
    return text


@dataclass
class ForkPoint:
    """Where a fork starts: after stage (`iteration`, `stage`), or after the end with `instruction`."""

    iteration: int | None = None
    stage: str | None = None
    text: str | None = None  # replaces that stage's text
    instruction: str | None = None  # a follow-up user instruction after the parent's final image
    parent: str | None = None  # the parent job's id (lineage only)

    def lineage(self) -> dict[str, Any]:
        out = {"job_id": self.parent, "iteration": self.iteration, "stage": self.stage}
        if self.instruction is not None:
            out["instruction"] = self.instruction
        return out


@dataclass
class Fork:
    """What the pipeline replays: the parent's stage records up to the fork point (the last one's
    text replaced when edited), the images they refer to, and a pending follow-up instruction."""

    stages: list[dict[str, Any]]
    images: dict[str, np.ndarray] = field(default_factory=dict)  # file name -> (H, W, 3) uint8
    instruction: str | None = None  # added after the replayed stages, once the protocol ends
    lineage: dict[str, Any] = field(default_factory=dict)

    def needed_images(self) -> list[str]:
        return [s["image"] for s in self.stages if s.get("image")]

    def load_images(self, load: Callable[[str], np.ndarray]) -> Fork:
        self.images = {name: load(name) for name in self.needed_images()}
        return self


def params_from_trajectory(
    trajectory: dict[str, Any], input_image: np.ndarray | None = None
) -> GenerationParams:
    """The parent's GenerationParams (seed included) from its trajectory record."""
    s = trajectory["settings"]
    return GenerationParams(
        prompt=trajectory["prompt"],
        protocol=trajectory["protocol"],
        width=int(trajectory["width"]),
        height=int(trajectory["height"]),
        max_iterations=int(s["max_iterations"]),
        think=bool(s["think"]),
        draft=_image_settings(s["draft"]),
        refine=_image_settings(s["refine"]),
        plan=TextSettings(**s["plan"]),
        reflect=TextSettings(**s["reflect"]),
        templates=dict(s.get("templates", {})),
        seed=int(trajectory["seed"]),
        input_image=input_image,
    )


def _image_settings(d: dict[str, Any]) -> ImageSettings:
    return ImageSettings(**{**d, "cfg_interval": tuple(d["cfg_interval"])})


def plan_fork(trajectory: dict[str, Any], point: ForkPoint) -> Fork:
    """Check the fork point against the parent's trajectory and cut its stages there."""
    stages = [s for s in trajectory.get("stages", [])]
    if stages and any("rng" not in s for s in stages):
        raise InvalidParams("fork.job_id", "the parent's trajectory predates forking (no replay record)")
    if point.instruction is not None:
        if point.stage is not None or point.iteration is not None or point.text is not None:
            raise InvalidParams("fork.instruction", "a follow-up instruction forks from the end; omit stage")
        check_edit(point.instruction, "fork.instruction")
        if not any(s["stage"] in IMAGE_STAGES for s in stages):
            raise InvalidParams("fork.instruction", "the parent has no final image to follow up on")
        return Fork([dict(s) for s in stages], instruction=point.instruction, lineage=point.lineage())
    if point.stage is None or point.iteration is None:
        raise InvalidParams("fork.stage", "give iteration and stage, or instruction")
    if point.stage not in (*TEXT_STAGES, *IMAGE_STAGES):
        raise InvalidParams("fork.stage", "must be plan, draft, reflect, refine or instruction")
    at = [i for i, s in enumerate(stages) if s["iteration"] == point.iteration and s["stage"] == point.stage]
    if not at:
        done = ", ".join(f"{s['iteration']}/{s['stage']}" for s in stages) or "none"
        raise InvalidParams(
            "fork.stage",
            f"the parent has no completed stage {point.stage} in iteration {point.iteration} "
            f"(completed: {done})",
        )
    cut = [dict(s) for s in stages[: at[-1] + 1]]
    lineage = point.lineage()
    if point.text is not None:
        if point.stage not in TEXT_STAGES:
            raise InvalidParams("fork.text", f"a {point.stage} stage is an image; it takes no text")
        check_edit(point.text, "fork.text")
        last = cut[-1]
        key = "instruction" if last["stage"] == "instruction" else "text"
        lineage["replaced_text"] = last[key]
        last[key] = point.text
        last["edited"] = True
        last.pop("positions", None)  # the context after it is the new text's (model/spec/budget.py)
    return Fork(cut, lineage=lineage)
