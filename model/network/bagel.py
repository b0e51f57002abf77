"""BAGEL composed: the MoT language model, the vision tower, and the generation heads.

Shapes: T=tokens, N=image tokens, E=LLM hidden, P=packed latent token (2*2*16 = 64).

This module owns the parameters of ema.safetensors, under their checkpoint names, and turns inputs
into token embeddings. Token embeddings by type (BAGEL.md 3.4):
  text and image markers:  embed_tokens[id]
  ViT token:               connector(SigLIP(patch)) + vit_pos_embed[row*70 + col]
  VAE / noisy latent:      vae2llm(x) + time_embedder(t) + latent_pos_embed[row*64 + col]
The two position tables are fixed 2-D sin-cos (`sincos_2d`) but stored in the checkpoint.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from strokes.model.network.config import BagelConfig
from strokes.model.network.decoder import LanguageModel
from strokes.model.network.vit import Connector, SiglipVisionModel


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): sin then cos of positions * 10000^(-k/(dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = positions.reshape(-1).astype(np.float64)[:, None] * omega[None]  # (M, dim/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) float32; row r*grid + c = concat(E(c), E(r)): the first half encodes the column."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")  # (G, G) each
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(table).float()


class PositionEmbedding(nn.Module):
    """A fixed 2-D sin-cos table looked up by flattened position id."""

    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, dim), requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] (not scaled) -> (N, E): MLP over [cos(t*phi), sin(t*phi)] (cos first)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        phi = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * phi[None]  # (N, half)
        freqs = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 256)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class Bagel(nn.Module):
    def __init__(self, cfg: BagelConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        e = cfg.llm.hidden_size
        self.language_model = LanguageModel(cfg.llm, attn_impl)
        self.vit_model = SiglipVisionModel(cfg.vit)
        self.connector = Connector(cfg.vit.hidden_size, e)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, e)
        self.time_embedder = TimestepEmbedder(e)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, e)
        self.llm2vae = nn.Linear(e, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, e)

    def init_position_tables(self) -> None:
        """Fill the two sin-cos tables from their formula (for freshly built random models)."""
        e = self.cfg.llm.hidden_size
        with torch.no_grad():
            self.vit_pos_embed.pos_embed.copy_(sincos_2d(e, self.cfg.vit_max_num_patch_per_side))
            self.latent_pos_embed.pos_embed.copy_(sincos_2d(e, self.cfg.max_latent_size))

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    # ---- embeddings ---------------------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)  # (T,) -> (T, E)

    def vit_features(
        self, patches: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """patches (N, 14*14*3) -> (SigLIP output (N, C), connector output (N, E))."""
        vit_out = self.vit_model(patches, position_ids)
        return vit_out, self.connector(vit_out)

    def embed_vit(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        _, connected = self.vit_features(patches, position_ids)
        return connected + self.vit_pos_embed(position_ids).to(connected.dtype)  # (N, E)

    def embed_latents(
        self, x: torch.Tensor, t: float | torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """x (N, P) packed latent tokens at flow time t (a float, or a (1,) tensor on x's device) -> (N, E)."""
        if not isinstance(t, torch.Tensor):
            t = torch.full((1,), t, device=x.device)  # a fill kernel, not a host-to-device copy
        te = self.time_embedder(t)  # (1, E), broadcast over N
        return self.vae2llm(x.to(self.dtype)) + te + self.latent_pos_embed(position_ids).to(te.dtype)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states of latent tokens (..., E) -> predicted velocity (..., P)."""
        return self.llm2vae(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.language_model.lm_head.weight)
