"""Per-request parameters of a process-driven generation, with their validation.

Defaults follow BAGEL's own entry points (BAGEL.md section 5.7): drafts use its text-to-image
settings, refinements its edit settings. `validate()` raises `InvalidParams` naming the field, so a
caller (the HTTP service, the CLI) can report a clear error before any GPU work starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from strokes.model.spec.forks import Fork

Protocol = Literal["guided", "interleaved"]
RenormType = Literal["global", "channel", "text_channel"]

# BAGEL's latent grid: 16 px per generation token, at most 64 tokens per side (BAGEL.md 1.2).
SIZE_MULTIPLE = 16
MIN_SIDE = 32
MAX_SIDE = 1024


class InvalidParams(ValueError):
    """A request parameter is out of range. `field` names it (dotted for nested settings)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ImageSettings:
    """How one image (a draft or a refinement) is denoised."""

    steps: int = 50  # num_timesteps: the schedule has `steps` points, so steps - 1 Euler steps
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: RenormType = "global"
    cfg_renorm_min: float = 0.0
    timestep_shift: float = 3.0

    def validate(self, prefix: str) -> None:
        if not 2 <= self.steps <= 200:
            raise InvalidParams(f"{prefix}.steps", "must be between 2 and 200")
        for name in ("cfg_text_scale", "cfg_img_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 20.0):
                raise InvalidParams(f"{prefix}.{name}", "must be between 0 and 20")
        lo, hi = self.cfg_interval
        if not (0.0 <= lo <= hi <= 1.0):
            raise InvalidParams(f"{prefix}.cfg_interval", "must be [lo, hi] with 0 <= lo <= hi <= 1")
        if self.cfg_renorm_type not in ("global", "channel", "text_channel"):
            raise InvalidParams(f"{prefix}.cfg_renorm_type", "must be global, channel or text_channel")
        if not (math.isfinite(self.cfg_renorm_min) and 0.0 <= self.cfg_renorm_min <= 1.0):
            raise InvalidParams(f"{prefix}.cfg_renorm_min", "must be between 0 and 1")
        if not (math.isfinite(self.timestep_shift) and 0.1 <= self.timestep_shift <= 10.0):
            raise InvalidParams(f"{prefix}.timestep_shift", "must be between 0.1 and 10")


# BAGEL's text-to-image and edit settings (app.py / inference.ipynb).
DRAFT_DEFAULTS = ImageSettings()
REFINE_DEFAULTS = ImageSettings(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")


MIN_TEMPERATURE = 0.01


@dataclass(frozen=True)
class TextSettings:
    """How one text stage (a plan or a reflection) is decoded."""

    max_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.3

    def validate(self, prefix: str) -> None:
        if not 1 <= self.max_tokens <= 4096:
            raise InvalidParams(f"{prefix}.max_tokens", "must be between 1 and 4096")
        # Below MIN_TEMPERATURE, logits / temperature overflows float32 and sampling can only fail.
        if not (math.isfinite(self.temperature) and MIN_TEMPERATURE <= self.temperature <= 2.0):
            raise InvalidParams(f"{prefix}.temperature", f"must be in [{MIN_TEMPERATURE}, 2]")


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    protocol: Protocol = "guided"
    width: int = 1024
    height: int = 1024
    max_iterations: int = 3
    draft: ImageSettings = DRAFT_DEFAULTS
    refine: ImageSettings = REFINE_DEFAULTS
    plan: TextSettings = TextSettings()
    reflect: TextSettings = TextSettings(max_tokens=256)
    seed: int | None = None
    think: bool = True  # guided: start from BAGEL's GEN_THINK system prompt
    input_image: np.ndarray | None = field(default=None, repr=False)  # (H, W, 3) uint8 start image
    templates: dict[str, str] = field(default_factory=dict)  # stage instruction overrides
    preview_every: int = 0  # emit a small preview every k denoising steps (0: never)
    max_prompt_chars: int = 4000

    def validate(self, max_side: int = MAX_SIDE) -> GenerationParams:
        if not self.prompt or not self.prompt.strip():
            raise InvalidParams("prompt", "must not be empty")
        if len(self.prompt) > self.max_prompt_chars:
            raise InvalidParams("prompt", f"must be at most {self.max_prompt_chars} characters")
        if self.protocol not in ("guided", "interleaved"):
            raise InvalidParams("protocol", "must be guided or interleaved")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value % SIZE_MULTIPLE or not MIN_SIDE <= value <= max_side:
                raise InvalidParams(
                    name, f"must be a multiple of {SIZE_MULTIPLE} between {MIN_SIDE} and {max_side}"
                )
        if not 1 <= self.max_iterations <= 8:
            raise InvalidParams("max_iterations", "must be between 1 and 8")
        self.draft.validate("draft")
        self.refine.validate("refine")
        self.plan.validate("plan")
        self.reflect.validate("reflect")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidParams("seed", "must be between 0 and 2**63 - 1")
        if not 0 <= self.preview_every <= 200:
            raise InvalidParams("preview_every", "must be between 0 and 200")
        if self.input_image is not None:
            img = self.input_image
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise InvalidParams("input_image", "must be an RGB uint8 image")
        from strokes.model.spec.prompts import TEMPLATE_NAMES  # local: prompts imports nothing heavy

        for key, text in self.templates.items():
            if key not in TEMPLATE_NAMES:
                raise InvalidParams(f"templates.{key}", f"unknown template; known: {sorted(TEMPLATE_NAMES)}")
            if not isinstance(text, str) or len(text) > 4000:
                raise InvalidParams(f"templates.{key}", "must be a string of at most 4000 characters")
        return self

    def replace(self, **changes) -> GenerationParams:
        return replace(self, **changes)


def settings_dict(settings: ImageSettings | TextSettings) -> dict:
    return {f.name: getattr(settings, f.name) for f in fields(settings)}


@dataclass(frozen=True)
class RunOptions:
    """How one run goes beyond its parameters (the pipeline's `run` takes them): steering, and a hook
    for tests. The defaults run a plain generation."""

    fork: Fork | None = None  # replay a recorded trajectory up to a stage first (model/spec/forks.py)
    pause_after: tuple[str, ...] = ()  # end with a Paused event after the first such stage (plan, reflect)
    warm_key: str | None = None  # keep the run's contexts under this key (model/generation/warm.py)
    # (ids decoded so far, logits (V,)) -> logits: lets a test script the model's text
    logits_processor: Callable[[Any, Any], Any] | None = None
