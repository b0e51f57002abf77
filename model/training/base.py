"""The base model of a training run, read from a checkpoint folder in the official layout.

`load_base(folder, device, dtype)` builds `TrainingBagel` (Bagel with the training forward, the
same parameter names) on the meta device and assigns ema.safetensors onto `device` in `dtype`,
checking every key and shape as inference does (model/generation/loading.py); the VAE
(ae.safetensors) is loaded in float32 and frozen, as the official script freezes it. The fixed
sin-cos position tables stay frozen (the checkpoint stores them; the official code never trains
them). The tokenizer's BAGEL ids give the packing its special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from strokes.model.generation.loading import load_safetensors_into, resolve_checkpoint
from strokes.model.network.config import BagelConfig, CheckpointError, load_config
from strokes.model.network.tokenizer import BagelTokenizer
from strokes.model.network.vae import AutoEncoder
from strokes.model.training.forward import TrainingBagel
from strokes.model.training.plan import SpecialTokens


@dataclass
class Base:
    folder: Path
    cfg: BagelConfig
    model: TrainingBagel
    vae: AutoEncoder
    tokenizer: BagelTokenizer

    @property
    def special_tokens(self) -> SpecialTokens:
        t = self.tokenizer
        return SpecialTokens(t.bos_id, t.eos_id, t.start_of_image, t.end_of_image)


def load_base(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Base:
    path = resolve_checkpoint(folder)
    cfg = load_config(path)
    tokenizer = BagelTokenizer.from_folder(path)
    if len(tokenizer) > cfg.llm.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but llm_config.json's vocab_size is {cfg.llm.vocab_size}"
        )
    with torch.device("meta"):
        model, vae = TrainingBagel(cfg), AutoEncoder(cfg.vae)
    load_safetensors_into(model, path / "ema.safetensors", device, dtype)
    load_safetensors_into(vae, path / "ae.safetensors", device, torch.float32)
    vae.eval().requires_grad_(False)
    model.vit_pos_embed.pos_embed.requires_grad_(False)
    model.latent_pos_embed.pos_embed.requires_grad_(False)
    return Base(path, cfg, model.train(), vae, tokenizer)
