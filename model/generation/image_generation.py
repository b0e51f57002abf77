"""Image generation on explicit KV caches: denoise one image under up to three guidance contexts,
yielding a `FlowStep` per Euler step, then decode it with the VAE.

Shapes: N=latent tokens of an image (h*w, 16 px each), P=packed latent channels (64),
E=LLM hidden.

The three contexts are cond, text-unconditional and image-unconditional (BAGEL.md 4.3-5.4); each
step's image block goes into room after each context (`branch_rooms`), so generation never commits
to them. The branches a step needs run batched in one forward by default (`Engine.batch_branches`),
one after another like the reference, or one per device (`Engine.branch_group`, model/generation/parallel.py).
No step of the denoising loop waits for the GPU: the schedule is copied to the device once, and
the decisions (how many branches, which guidance) are taken on its CPU copy.

Randomness is explicit: the initial latent noise is the caller's tensor or is drawn from the
caller's CPU `torch.Generator`, so one seed gives the same noise on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from strokes.model.generation.cancel import Cancelled, ShouldCancel
from strokes.model.generation.sampler import combine_guidance, euler_step, guidance_scales, timestep_schedule
from strokes.model.network.kv_cache import Context, branch_rooms
from strokes.model.network.transforms import latent_position_ids
from strokes.model.spec.params import ImageSettings

if TYPE_CHECKING:
    from strokes.model.generation.engine import Engine


@dataclass
class FlowStep:
    """One Euler step; the branch predictions are kept only when tracing."""

    index: int  # 0-based
    total: int  # steps - 1
    t: float
    x_t: torch.Tensor | None = field(default=None, repr=False)  # (N, P) input latent
    v_cond: torch.Tensor | None = field(default=None, repr=False)
    v_text_uncond: torch.Tensor | None = field(default=None, repr=False)
    v_img_uncond: torch.Tensor | None = field(default=None, repr=False)
    v: torch.Tensor | None = field(default=None, repr=False)  # combined velocity
    preview: np.ndarray | None = field(default=None, repr=False)  # small uint8 image of the predicted x0


@dataclass(frozen=True, kw_only=True)
class ImageGenerationOptions:
    """How one image is generated; `Engine.generate_image` takes these as keywords and holds the
    defaults."""

    height: int  # pixels, multiples of the latent downsample
    width: int
    settings: ImageSettings  # steps, guidance scales and interval, renorm, timestep shift
    noise: torch.Tensor | None  # (N, P) initial latent noise; None: drawn from `generator`
    generator: torch.Generator | None
    should_cancel: ShouldCancel  # polled before each step
    trace: bool  # keep every step's input latent and branch predictions
    preview_every: int  # a preview of the predicted x0 every that many steps; 0: none


class ImageGeneration:
    """Denoise one image with up to three guidance contexts; iterate for `FlowStep`s.

    Afterwards `latent` (N, P) holds the final packed latent and `pixels` the decoded uint8 image.
    `img_uncond` may be the very same object as `cond` (BAGEL's plain text-to-image, where the
    image-unconditional context equals the conditional one): its prediction is then reused, not
    recomputed.
    """

    def __init__(
        self,
        engine: Engine,
        cond: Context,
        text_uncond: Context,
        img_uncond: Context,
        options: ImageGenerationOptions,
    ):
        cfg, height, width = engine.cfg, options.height, options.width
        ds = cfg.latent_downsample
        if height % ds or width % ds:
            raise ValueError(f"image height and width must be multiples of {ds}, got {height}x{width}")
        if max(height, width) > cfg.max_image_side:
            raise ValueError(f"image sides must be at most {cfg.max_image_side}, got {height}x{width}")
        self.engine, self.contexts, self.options = engine, (cond, text_uncond, img_uncond), options
        self.h, self.w = height // ds, width // ds
        n = self.h * self.w
        noise = options.noise
        if noise is None:
            noise = torch.randn(n, cfg.patch_latent_dim, generator=options.generator)
        if tuple(noise.shape) != (n, cfg.patch_latent_dim):
            raise ValueError(f"noise must have shape {(n, cfg.patch_latent_dim)}, got {tuple(noise.shape)}")
        self.noise = noise
        self.latent: torch.Tensor | None = None
        self.pixels: np.ndarray | None = None
        self.forwards = 0  # branch forwards run

    def _velocities(self, block: torch.Tensor, branches: list[Context]) -> list[torch.Tensor]:
        """One (N, P) prediction per branch context, batched in one forward or one after another
        like the reference (several devices: `BranchGroup.step` instead)."""
        lm, model = self.engine.model.language_model, self.engine.model
        gen = slice(1, block.shape[1] - 1)
        if self.engine.batch_branches:
            hidden = lm.forward_block(block.expand(len(branches), -1, -1), branches, gen=gen)  # (B, N+2, E)
            v = model.velocity(hidden[:, gen])  # (B, N, P)
            return list(v.unbind(0))
        return [model.velocity(lm.forward_block(block, [ctx], gen=gen)[0, gen]) for ctx in branches]

    def _branch_counts(self, ts: torch.Tensor) -> list[int]:
        """How many branches each step runs (decided on the CPU copy of the schedule)."""
        s, same = self.options.settings, self.contexts[2] is self.contexts[0]
        counts = []
        for t in ts:
            text_scale, img_scale = guidance_scales(t, s.cfg_text_scale, s.cfg_img_scale, s.cfg_interval)
            counts.append(1 if text_scale <= 1.0 else 3 if img_scale > 1.0 and not same else 2)
        return counts

    @torch.inference_mode()
    def __iter__(self) -> Iterator[FlowStep]:
        engine, s = self.engine, self.options.settings
        cond, text_uncond, img_uncond = self.contexts
        device = engine.device
        pos = latent_position_ids(self.h, self.w, engine.cfg.max_latent_size).to(device)
        x = self.noise.to(device, torch.float32)  # (N, P), the ODE state stays float32
        ts, dts = timestep_schedule(s.steps, s.timestep_shift)  # CPU: decisions and event values
        ts_dev, dts_dev = ts.to(device), dts.to(device)  # copied once, not once per step
        counts = self._branch_counts(ts)
        # Each branch reads its context plus room for the block, set up once for the whole image
        # (several devices: on the rank that runs the branch).
        contexts, room = [cond, text_uncond, img_uncond][: max(counts)], self.h * self.w + 2
        group = engine.branch_group
        if group is None:
            rooms = branch_rooms(contexts, room)
        else:
            group.start_image(contexts, room, self.h, self.w)
        try:
            yield from self._denoise(x, pos, ts, ts_dev, dts_dev, counts, rooms if group is None else None)
        finally:
            if group is not None:
                group.end_image()

    def _denoise(self, x, pos, ts, ts_dev, dts_dev, counts, rooms) -> Iterator[FlowStep]:
        engine, o, group = self.engine, self.options, self.engine.branch_group
        s = o.settings
        for i in range(len(ts)):
            if o.should_cancel():
                raise Cancelled
            t = ts[i]
            text_scale, img_scale = guidance_scales(t, s.cfg_text_scale, s.cfg_img_scale, s.cfg_interval)
            if group is not None:
                v_all = group.step(x, ts_dev[i : i + 1], counts[i])
            else:
                block = engine.image_block(
                    engine.model.embed_latents(x, ts_dev[i : i + 1], pos)
                )  # (1, N+2, E)
                v_all = self._velocities(block, rooms[: counts[i]])
            self.forwards += counts[i]
            c = v_all[0].float()
            ut = v_all[1].float() if text_scale > 1.0 else None
            ui = (v_all[2].float() if len(v_all) > 2 else c) if text_scale > 1.0 and img_scale > 1.0 else None
            v = combine_guidance(c, ut, ui, text_scale, img_scale, s.cfg_renorm_type, s.cfg_renorm_min)
            step = FlowStep(i, len(ts), float(t))
            if o.trace:
                step.x_t, step.v_cond, step.v_text_uncond, step.v_img_uncond, step.v = x, c, ut, ui, v
            if o.preview_every and (i + 1) % o.preview_every == 0 and i + 1 < len(ts):
                step.preview = self._preview(x - ts_dev[i] * v)  # x0 = x_t - t v (the event needs it)
            x = euler_step(x, v, dts_dev[i])
            yield step
        self.latent = x
        self.pixels = engine.decode_latent(x, o.height, o.width)

    def _preview(self, x0: torch.Tensor, side: int = 256) -> np.ndarray:
        """The current estimate of the clean image, at most `side` pixels on its long edge."""
        o = self.options
        pixels = Image.fromarray(self.engine.decode_latent(x0, o.height, o.width))
        pixels.thumbnail((side, side), Image.Resampling.BICUBIC)
        return np.asarray(pixels)
