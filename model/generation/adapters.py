"""LoRA adapters made by `strokes train`, merged into the base weights when a model is loaded.

An adapter folder holds:
- adapter_config.json: {"format": "strokes-lora", "version": 1, "rank", "alpha", "modules": [...],
  "full_tensors": [...], "base": {the geometry of the base it was trained on}};
- adapter.safetensors: for every module M of "modules", `M.lora_A` (rank, in) and `M.lora_B`
  (out, rank); for every name of "full_tensors", the trained tensor itself (small modules trained
  in full beside the adapters, e.g. the velocity head).
Merging computes W + (alpha / rank) * B @ A in float32 and casts back to W's dtype, so the served
model is the base model with new weights: no extra module, no extra matmul, serving speed
unchanged. Every name and shape is checked against the model, and the base geometry against the
checkpoint; errors name the adapter file and the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from strokes.model.network.config import BagelConfig, CheckpointError

FORMAT = "strokes-lora"
VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"


def base_geometry(cfg: BagelConfig) -> dict[str, int]:
    """What an adapter must agree with: the sizes of the network it was trained on."""
    llm, vit = cfg.llm, cfg.vit
    return {
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_layers": llm.num_layers,
        "num_heads": llm.num_heads,
        "num_kv_heads": llm.num_kv_heads,
        "vocab_size": llm.vocab_size,
        "vit_hidden_size": vit.hidden_size,
        "vit_num_layers": vit.num_layers,
    }


def read_adapter_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: adapter folder not found")
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder}: not a strokes adapter (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: format {config.get('format')!r} v{config.get('version')} is not {FORMAT} v{VERSION}"
        )
    for key in ("rank", "alpha", "modules", "full_tensors", "base"):
        if key not in config:
            raise CheckpointError(f"{path}: missing key {key!r}")
    return config


@torch.no_grad()
def merge_adapter(model: nn.Module, cfg: BagelConfig, folder: str | Path) -> dict:
    """Merge the adapter in `folder` into `model` (in place); returns its config."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    want = base_geometry(cfg)
    if config["base"] != want:
        trained = config["base"]
        differ = ", ".join(f"{k} {trained.get(k)} vs {want[k]}" for k in want if trained.get(k) != want[k])
        raise CheckpointError(f"{folder / CONFIG_FILE}: trained on another base model ({differ})")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    path = folder / WEIGHTS_FILE
    scaling = float(config["alpha"]) / int(config["rank"])
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        expected = {f"{m}.lora_{x}" for m in config["modules"] for x in "AB"} | set(config["full_tensors"])
        if keys != expected:
            odd = sorted(keys ^ expected)
            raise CheckpointError(f"{path}: tensors do not match {CONFIG_FILE} (e.g. {', '.join(odd[:3])})")
        for name in config["modules"]:
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                raise CheckpointError(f"{path}: {name} is not a linear layer of this model")
            a, b = f.get_tensor(f"{name}.lora_A").float(), f.get_tensor(f"{name}.lora_B").float()
            w = module.weight
            if a.shape != (config["rank"], w.shape[1]) or b.shape != (w.shape[0], config["rank"]):
                raise CheckpointError(
                    f"{path}: {name}.lora_A/B have shapes {list(a.shape)}/{list(b.shape)}, "
                    f"which do not fit a weight of shape {list(w.shape)} at rank {config['rank']}"
                )
            w.copy_((w.float() + scaling * (b.to(w.device) @ a.to(w.device))).to(w.dtype))
        for name in config["full_tensors"]:
            param = params.get(name)
            value = f.get_tensor(name)
            if param is None or param.shape != value.shape:
                raise CheckpointError(f"{path}: {name} {list(value.shape)} does not fit this model")
            param.copy_(value.to(param.device, param.dtype))
    return config
