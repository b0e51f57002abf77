"""The SigLIP vision tower BAGEL uses to see images, and its connector into the language model.

Shapes: N=patch tokens of one image, C=ViT hidden size, P=flattened patch (14*14*3, (py, px, c)
order), E=LLM hidden size, H=heads, D=head_dim.

The patch embedding is a Linear layer over flattened patches (the checkpoint stores the conv as
Linear after `convert_conv2d_to_linear`), plus a learned position table indexed row*70 + col.
Pre-LN blocks with full attention within one image, then `post_layernorm`. Names match the
checkpoint (`vit_model.vision_model...`); the model runs num_hidden_layers - 1 layers (config.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strokes.model.network.config import ViTConfig


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        c = cfg.hidden_size
        self.q_proj, self.k_proj = nn.Linear(c, c), nn.Linear(c, c)
        self.v_proj, self.out_proj = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape
        shape = (1, n, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (1, H, N, D)
        k = self.k_proj(x).view(shape).transpose(1, 2)  # (1, H, N, D)
        v = self.v_proj(x).view(shape).transpose(1, 2)  # (1, H, N, D)
        out = F.scaled_dot_product_attention(q, k, v)  # (1, H, N, D), bidirectional within the image
        return self.out_proj(out.transpose(1, 2).reshape(n, c))  # (N, C)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)  # (N, C)


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList([SiglipLayer(cfg) for _ in range(cfg.num_layers)])


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """patches (N, P), position_ids (N,) -> (N, C)."""
        x = self.embeddings(patches.to(self.post_layernorm.weight.dtype), position_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    """`vit_model`: holds `vision_model`, as the checkpoint names it."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.vision_model(patches, position_ids)


class Connector(nn.Module):
    """`connector`: ViT features (N, C) -> LLM space (N, E)."""

    def __init__(self, vit_hidden: int, llm_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(vit_hidden, llm_hidden)
        self.fc2 = nn.Linear(llm_hidden, llm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))
