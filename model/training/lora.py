"""Low-rank adapters on the projections of either expert, our own small module (not peft).

Why our own: the adapters must sit on checkpoint-named `nn.Linear`s of both experts (`q_proj` of
the understanding expert, `q_proj_moe_gen` of the generation one), be sharded by FSDP2 like any
parameter, and come out as a file the worker merges at load (model/generation/adapters.py). peft
would wrap modules under new names and bring its own save format for a dozen lines of arithmetic.

`LoRALinear` IS an `nn.Linear` (same `weight` and `bias`, so the base keys of a state dict do not
change) with two more parameters: y = x W^T + b + (alpha / r) * (x A^T) B^T, with A (r, in) drawn
like peft's (Kaiming-uniform) and B (out, r) zero, so training starts from the base model exactly.
`apply_lora` replaces the targeted layers of every decoder layer; every other parameter is frozen,
except the small modules named in `full` (trained in full and saved beside the adapters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from strokes.model.network.bagel import Bagel
from strokes.model.training.config import ATTENTION, MLP

EXPERTS = ("und", "gen")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    experts: tuple[str, ...] = EXPERTS  # und: text/ViT expert; gen: the image expert (*_moe_gen)
    targets: tuple[str, ...] = ATTENTION + MLP
    full: tuple[str, ...] = ()  # small modules trained in full, e.g. ("llm2vae",)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError("lora rank: must be at least 1")
        bad = [e for e in self.experts if e not in EXPERTS] or [
            t for t in self.targets if t not in ATTENTION + MLP
        ]
        if bad or not self.experts or not self.targets:
            raise ValueError(f"lora: experts from {EXPERTS} and targets from {ATTENTION + MLP}, not {bad}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """A linear layer with a low-rank update; shares the base layer's weight and bias."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.scaling = rank, alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        low = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)  # (..., out)
        return out + (self.scaling * low).to(out.dtype)


def target_names(model: Bagel, cfg: LoRAConfig) -> list[str]:
    """Module names of the targeted projections, e.g. language_model.model.layers.0.self_attn.q_proj_moe_gen."""
    names = []
    for i in range(len(model.language_model.model.layers)):
        prefix = f"language_model.model.layers.{i}"
        for target in cfg.targets:
            block = "self_attn" if target in ATTENTION else None
            for expert in cfg.experts:
                if block:
                    names.append(f"{prefix}.{block}.{target}" + ("_moe_gen" if expert == "gen" else ""))
                else:
                    names.append(f"{prefix}.{'mlp' if expert == 'und' else 'mlp_moe_gen'}.{target}")
    return names


def apply_lora(model: Bagel, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Freeze the model, put adapters on the targeted projections, unfreeze `cfg.full`. Returns the
    adapted module names. A (Kaiming-uniform) is drawn from `seed`, the same on every rank."""
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    names = target_names(model, cfg)
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            base = modules[name]
            if not isinstance(base, nn.Linear):
                raise ValueError(f"lora target {name} is not a linear layer")
            setattr(modules[parent_name], attr, LoRALinear(base, cfg.rank, cfg.alpha))
    for name in cfg.full:
        if name not in modules:
            raise ValueError(f"lora full module {name!r}: no such module")
        modules[name].requires_grad_(True)
    return names


def lora_tensors(named: dict[str, Tensor], modules: list[str], full: tuple[str, ...]) -> dict[str, Tensor]:
    """The adapter file's tensors out of a (full, gathered) state dict."""
    out = {f"{m}.lora_{x}": named[f"{m}.lora_{x}"] for m in modules for x in "AB"}
    for prefix in full:
        out.update({k: v for k, v in named.items() if k.startswith(prefix + ".")})
    return out
