"""Sampling and guidance as small pure functions on tensors (BAGEL.md sections 5.2-5.4 and 6).

Shapes: N=latent tokens, P=packed latent channels (64), V=vocabulary.

Flow convention: x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0, and the sampler walks
t from 1 to 0 with plain Euler over `steps - 1` steps of a shifted linear schedule (t = 0 is never
evaluated). Guidance combines three predictions: c (cond), ut (text-unconditional), ui
(image-unconditional). Renorms only ever shrink the guided velocity. Where the reference does the
guidance arithmetic in bfloat16, this is done in float32 (identical in float32, closer in bf16).
"""

from __future__ import annotations

import torch

RENORM_TYPES = ("global", "channel", "text_channel")


def timestep_schedule(steps: int, shift: float, device: torch.device | str = "cpu"):
    """(t, dt) for each of the steps - 1 Euler steps: t_i = s*tau / (1 + (s-1)*tau), tau = linspace(1, 0, steps)."""
    tau = torch.linspace(1, 0, steps, device=device)
    t = shift * tau / (1 + (shift - 1) * tau)
    return t[:-1], t[:-1] - t[1:]


def guidance_scales(
    t: torch.Tensor, cfg_text_scale: float, cfg_img_scale: float, cfg_interval: tuple[float, float]
) -> tuple[float, float]:
    """Guidance applies only while lo < t <= hi (strict lower bound, on the shifted t); else (1, 1)."""
    lo, hi = cfg_interval
    if bool(t > lo) and bool(t <= hi):
        return cfg_text_scale, cfg_img_scale
    return 1.0, 1.0


def _renorm(reference: torch.Tensor, guided: torch.Tensor, per_token: bool, minimum: float) -> torch.Tensor:
    """Shrink `guided` so its norm does not exceed the norm of `reference` (clamped to [minimum, 1])."""
    if per_token:
        ref_norm = reference.norm(dim=-1, keepdim=True)  # (N, 1)
        norm = guided.norm(dim=-1, keepdim=True)  # (N, 1)
    else:
        ref_norm, norm = reference.norm(), guided.norm()
    return guided * (ref_norm / (norm + 1e-8)).clamp(min=minimum, max=1.0)


def combine_guidance(
    c: torch.Tensor,
    ut: torch.Tensor | None,
    ui: torch.Tensor | None,
    text_scale: float,
    img_scale: float,
    renorm_type: str,
    renorm_min: float,
) -> torch.Tensor:
    """Guided velocity (N, P) from the branch predictions, exactly as BAGEL's _forward_flow.

    Guidance happens only when text_scale > 1 (otherwise v = c, even if img_scale > 1); the
    image-unconditional prediction is used only when img_scale > 1.
    """
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {renorm_type!r}")
    if text_scale <= 1.0:
        return c
    gt = ut + text_scale * (c - ut)
    if renorm_type == "text_channel":
        gt = _renorm(c, gt, per_token=True, minimum=renorm_min)
        return ui + img_scale * (gt - ui) if img_scale > 1.0 else gt
    g = ui + img_scale * (gt - ui) if img_scale > 1.0 else gt
    return _renorm(c, g, per_token=renorm_type == "channel", minimum=renorm_min)


def euler_step(x: torch.Tensor, v: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """x (N, P) float32 moved from t to t - dt along the predicted velocity."""
    return x - v.float() * dt


def sample_token(
    logits: torch.Tensor, do_sample: bool, temperature: float, generator: torch.Generator | None = None
) -> int:
    """logits (V,) -> a token id: argmax when not sampling (temperature ignored), else
    multinomial(softmax(logits / temperature)) drawn on the CPU generator (same draw on any device)."""
    if not do_sample:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))
