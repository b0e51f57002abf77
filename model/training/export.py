"""What a run makes, in a form the service loads: a checkpoint folder in the official layout, or a
LoRA adapter that the worker merges at load (model/generation/adapters.py).

- `gather_weights` collects the full weights on rank 0 (FSDP2 shards gathered, on the CPU), with
  the EMA in place of the trained values when the run keeps one (the official ema.safetensors is
  the EMA model).
- `export_checkpoint` writes ema.safetensors with exactly the base's keys, in the base file's
  dtype, and copies every other file of the base folder (ae.safetensors, configs, tokenizer), so
  `strokes worker --checkpoint OUT` serves it as it serves BAGEL-7B-MoT. LoRA weights are merged
  first (`merged_weights`).
- `export_adapter` writes adapter.safetensors (the low-rank pairs and any small modules trained in
  full) and adapter_config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from strokes.model.generation import adapters
from strokes.model.network.config import BagelConfig
from strokes.model.training.distributed import Dist
from strokes.model.training.lora import LoRAConfig, lora_tensors
from strokes.model.training.optim import EMA

WEIGHTS = "ema.safetensors"


def gather_weights(model: nn.Module, ema: EMA | None, d: Dist) -> dict[str, Tensor]:
    """Full weights on rank 0 (an empty dict elsewhere); every rank calls this."""
    if d.enabled:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if ema is not None:
        for name, shadow in ema.shadow.items():
            full = shadow.full_tensor() if hasattr(shadow, "full_tensor") else shadow
            if d.main:
                state[name] = full.detach().cpu().to(state[name].dtype)
    return state if d.main else {}


def merged_weights(state: dict[str, Tensor], modules: list[str], lora: LoRAConfig) -> dict[str, Tensor]:
    """The base-named weights with every low-rank pair merged in (W + alpha/r * B @ A)."""
    out = {k: v for k, v in state.items() if ".lora_" not in k}
    for m in modules:
        w = out[f"{m}.weight"]
        delta = lora.scaling * (state[f"{m}.lora_B"].float() @ state[f"{m}.lora_A"].float())
        out[f"{m}.weight"] = (w.float() + delta).to(w.dtype)
    return out


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _base_dtype(base: Path) -> torch.dtype:
    """The dtype the base checkpoint stores its weights in (read from the header, not the data)."""
    with safe_open(str(base / WEIGHTS), framework="pt") as f:
        return SAFETENSORS_DTYPES[f.get_slice(next(iter(f.keys()))).get_dtype()]


def export_checkpoint(out: Path, base: Path, weights: dict[str, Tensor]) -> Path:
    """The official layout: `weights` (base keys exactly) as ema.safetensors, the rest copied."""
    with safe_open(str(base / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    missing, extra = sorted(keys - set(weights)), sorted(set(weights) - keys)
    if missing or extra:
        raise ValueError(
            f"export: weights differ from {base / WEIGHTS}: missing {missing[:3]}, extra {extra[:3]}"
        )
    dtype = _base_dtype(base)
    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.is_file() and item.name != WEIGHTS:
            shutil.copy2(item, out / item.name)
    tensors = {k: weights[k].detach().to("cpu", dtype).contiguous() for k in sorted(keys)}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "producer": "strokes train"})
    return out


def export_adapter(
    out: Path, weights: dict[str, Tensor], modules: list[str], lora: LoRAConfig, cfg: BagelConfig, base: Path
) -> Path:
    tensors = lora_tensors(weights, modules, lora.full)
    full = sorted(k for k in tensors if ".lora_" not in k)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / adapters.WEIGHTS_FILE)
    )
    config = {
        "format": adapters.FORMAT,
        "version": adapters.VERSION,
        "rank": lora.rank,
        "alpha": lora.alpha,
        "experts": list(lora.experts),
        "targets": list(lora.targets),
        "modules": modules,
        "full_tensors": full,
        "base": adapters.base_geometry(cfg),
        "base_checkpoint": str(base),
    }
    (out / adapters.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_run(run: Path, out: Path, kind: str, step: int | None = None) -> Path:
    """Export a run's checkpoint (the latest, or that of `step`) after the fact, in one process:
    `adapter` (LoRA runs) or `checkpoint` (the official layout; LoRA merged in)."""
    from dataclasses import fields

    from strokes.model.training import checkpoint as ckpt
    from strokes.model.training.base import load_base
    from strokes.model.training.config import TrainConfig
    from strokes.model.training.lora import apply_lora

    config_file = run / "config.json"
    if not config_file.is_file():
        raise ckpt.ResumeError(f"{run}: not a training run folder (no config.json)")
    saved = json.loads(config_file.read_text())
    cfg = TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})
    path = ckpt.find(run, "auto" if step is None else str(run / ckpt.CHECKPOINTS / f"step_{step:08d}"))
    if path is None:
        raise ckpt.ResumeError(f"{run}: no checkpoint to export")
    if kind == "adapter" and cfg.mode != "lora":
        raise ValueError(f"{run}: a {cfg.mode} fine-tuning run has no adapter to export")
    base = load_base(cfg.checkpoint)
    lora = cfg.lora() if cfg.mode == "lora" else None
    modules = apply_lora(base.model, lora, cfg.seed) if lora else []
    if cfg.mode == "full":
        base.model.requires_grad_(True)
        base.model.vit_pos_embed.pos_embed.requires_grad_(False)
        base.model.latent_pos_embed.pos_embed.requires_grad_(False)
    named = [(n, p) for n, p in base.model.named_parameters() if p.requires_grad]
    ema = EMA(named, cfg.ema) if cfg.ema > 0 else None
    ckpt.load_weights(path, base.model, ema)
    d = Dist(0, 1, 0, torch.device("cpu"))
    weights = gather_weights(base.model, ema, d)
    if kind == "adapter":
        return export_adapter(out, weights, modules, lora, base.cfg, base.folder)
    if lora is not None:
        weights = merged_weights(weights, modules, lora)
    return export_checkpoint(out, base.folder, weights)
