"""The optimizer side of a step, as the official script does it: AdamW (betas 0.9/0.95, eps 1e-15,
no weight decay by default), gradients clipped to a total norm BEFORE the step (the pre-clip norm
is what is reported), then the step, the schedule, the EMA, zero_grad.

The schedule is `transformers`' `get_cosine_with_min_lr_schedule_with_warmup` (or the constant one
with warmup) written as a pure function of the number of steps already taken: the first step runs
at lr_at(0), which is 0 when there is a warmup (as in the official script). Parameters may be
FSDP2 DTensors: clipping, stepping and the EMA all work on their local shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-5
    min_lr: float = 1e-7  # the cosine schedule's floor
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant
    total_steps: int = 1000
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-15
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still measured)

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule: must be cosine or constant, not {self.schedule!r}")
        if self.lr <= 0 or self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0, total_steps >= 1 and warmup_steps >= 0")


def lr_at(step: int, cfg: OptimConfig) -> float:
    """The learning rate of the step after `step` steps were taken (transformers' LambdaLR values)."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = cfg.min_lr / cfg.lr
    return cfg.lr * (factor * (1 - floor) + floor)


def make_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        list(params), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Clip to `max_norm` (unless 0) and return the total norm before clipping."""
    with_grad = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in with_grad])


def optimizer_step(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], step: int, cfg: OptimConfig
) -> tuple[Tensor, float]:
    """Clip, set this step's learning rate, step, zero the gradients. Returns (pre-clip norm, lr)."""
    norm = clip_gradients(params, cfg.max_grad_norm)
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, lr


class EMA:
    """An exponential moving average of the trainable parameters (float32 copies of the local
    shards): ema = decay * ema + (1 - decay) * param after every step, as `fsdp_ema_update`."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], decay: float):
        self.decay = decay
        self.shadow: dict[str, Tensor] = {name: p.detach().float().clone() for name, p in named}

    @torch.no_grad()
    def update(self, named: list[tuple[str, nn.Parameter]]) -> None:
        for name, p in named:
            self.shadow[name].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"the EMA state lacks {missing[:3]}")
        with torch.no_grad():
            for name, value in self.shadow.items():
                value.copy_(state[name])
