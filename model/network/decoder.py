"""The BAGEL language model: a Qwen2 decoder whose every layer holds two experts (Mixture of
Transformers) that share one attention.

Shapes: B=batch (one row per guidance branch), T=tokens of the block being run, E=hidden size,
H=query heads, G=kv heads, D=head_dim, L=layers.

Routing is data, not dispatch: a block's tokens use the understanding expert (text, ViT tokens,
every image marker) except a contiguous run `gen` (VAE latent tokens) that uses the generation
expert (`*_moe_gen` weights); a packed training sequence (model/training/forward.py), whose
latent tokens lie in several runs, routes by index instead (`TokenExperts`). One softmax covers
every key of the branch: its cached context plus the block. q/k RMSNorm is applied per head before
RoPE; positions are 1-D (an image block shares one position). Parameter names are exactly the
checkpoint's (`language_model.model.layers.N...`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from strokes.model.network.attention import IMPLEMENTATIONS
from strokes.model.network.compiled import CompileOptions, Regions
from strokes.model.network.config import LLMConfig
from strokes.model.network.kv_cache import Context


@dataclass(frozen=True)
class TokenExperts:
    """The expert of every token of a packed sequence: positions `und` use the understanding
    expert, positions `gen` the generation one (disjoint, together every position)."""

    und: torch.Tensor  # (n_und,) long
    gen: torch.Tensor  # (n_gen,) long


Gen = slice | TokenExperts | None  # the tokens that use the generation expert; None: all understanding


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2 RMSNorm: normalise in float32, cast back to x's dtype, then scale (..., E) -> (..., E).
    Compiled (model/network/compiled.py), the float32 part stays in registers: one read, one write."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def route(x: torch.Tensor, gen: Gen, und_fn: Callable, gen_fn: Callable) -> torch.Tensor:
    """Apply the understanding function to every token but x[:, gen], which gets the generation one.

    Every op routed here works token by token, so an image block (two markers around N latent
    tokens) runs the generation expert on the whole block, then overwrites the marker rows with the
    understanding expert's output: no copy of the large latent part.
    """
    if gen is None:
        return und_fn(x)
    if isinstance(gen, TokenExperts):  # scattered runs: each expert on its own tokens, as the reference
        und_out = und_fn(x[:, gen.und])  # (B, n_und, ...)
        routed = und_out.new_empty(x.shape[0], x.shape[1], *und_out.shape[2:])  # (B, T, ...)
        routed[:, gen.und] = und_out
        routed[:, gen.gen] = gen_fn(x[:, gen.gen]).to(und_out.dtype)
        return routed
    out = gen_fn(x)  # (B, T, ...)
    und_out = und_fn(torch.cat([x[:, : gen.start], x[:, gen.stop :]], dim=1)).to(
        out.dtype
    )  # (B, T - n_gen, ...)
    out[:, : gen.start] = und_out[:, : gen.start]
    out[:, gen.stop :] = und_out[:, gen.start :]
    return out


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, D) for integer positions (B, T); computed in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, T, D) rotated by cos, sin (B, 1, T, D): x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, in the input dtype as the reference computes it."""
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


# attend(q (B, H, T, D), k (B, G, T, D), v (B, G, T, D)) -> (B, H, T, D): the cache-aware part.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        e, h, g, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, g, d
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(e, h * d, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(e, g * d, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(e, g * d, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(h * d, e, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(d, cfg.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(d, cfg.rms_norm_eps))

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gen: Gen
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, E) -> q (B, H, T, D), k (B, G, T, D) normed and rotated, v (B, G, T, D)."""
        b, t, _ = x.shape
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = route(x, gen, self.q_proj, self.q_proj_moe_gen).view(b, t, h, d)  # (B, T, H, D)
        k = route(x, gen, self.k_proj, self.k_proj_moe_gen).view(b, t, g, d)  # (B, T, G, D)
        v = route(x, gen, self.v_proj, self.v_proj_moe_gen).view(b, t, g, d)  # (B, T, G, D)
        if gen is not None:  # the reference normalises and rotates q, k in float32 for image blocks
            q, k = q.float(), k.float()
        q = route(q, gen, self.q_norm, self.q_norm_moe_gen).transpose(1, 2)  # (B, H, T, D)
        k = route(k, gen, self.k_norm, self.k_norm_moe_gen).transpose(1, 2)  # (B, G, T, D)
        q = apply_rope(q, cos, sin).to(x.dtype)
        k = apply_rope(k, cos, sin).to(x.dtype)
        return q, k, v.transpose(1, 2)

    def output(self, out: torch.Tensor, gen: Gen) -> torch.Tensor:
        """Attention output (B, H, T, D) -> (B, T, E) through the experts' o_proj."""
        b, h, t, d = out.shape
        out = out.transpose(1, 2).reshape(b, t, h * d)  # (B, T, H*D)
        return route(out, gen, self.o_proj, self.o_proj_moe_gen)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gen: Gen, attend: Attend
    ) -> torch.Tensor:
        return self.output(attend(*self.project(x, cos, sin, gen)), gen)


class MoTLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.self_attn = MoTAttention(cfg)
        self.mlp = MLP(cfg)
        self.mlp_moe_gen = MLP(cfg)
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
            setattr(self, f"{name}_moe_gen", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    # The layer in two regions around the cache-aware attention (model/network/compiled.py compiles
    # each once for every layer): everything element-wise or a matmul is in one of them.
    def attention_inputs(self, x, cos, sin, gen: Gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, E) -> q (B, H, T, D), k (B, G, T, D), v (B, G, T, D)."""
        a = route(x, gen, self.input_layernorm, self.input_layernorm_moe_gen)
        return self.self_attn.project(a, cos, sin, gen)

    def finish(self, x: torch.Tensor, attended: torch.Tensor, gen: Gen) -> torch.Tensor:
        """The residual stream x (B, T, E) after the attention output (B, H, T, D) and the MLP."""
        x = x + self.self_attn.output(attended, gen)
        m = route(x, gen, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        return x + route(m, gen, self.mlp, self.mlp_moe_gen)

    def forward(self, x, cos, sin, gen: Gen, attend: Attend) -> torch.Tensor:
        return self.finish(x, attend(*self.attention_inputs(x, cos, sin, gen)), gen)


class MoTDecoder(nn.Module):
    """`language_model.model`: embeddings, layers, and the two final norms."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([MoTLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """`language_model`: the decoder, its untied lm_head, and the block forward over KV caches."""

    def __init__(self, cfg: LLMConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.attn_impl = attn_impl
        self.regions = Regions()  # eager; `compile_regions` swaps in compiled ones (compiled.py)
        self.model = MoTDecoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def compile_regions(self, options: CompileOptions | None) -> None:
        """Run every layer's two regions compiled with `options` (None: eager again)."""
        self.regions = Regions(options)

    def forward_block(
        self,
        x: torch.Tensor,
        contexts: list[Context],
        *,
        gen: Gen = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Run one block of embeddings x (B, T, E) after each branch's context; final-normed (B, T, E).

        Row b of x attends to contexts[b] plus the block itself. Each row's keys and values are
        written into its cache right after the context (which must end where its cache ends and
        have room for T more: `KVCache.reserve`, or `branch_rooms` for guidance branches), then
        attention reads the cache's first length + T slots as a view: no concatenation, no copy.
        The caller commits the block with `advance`, or leaves it as uncommitted scratch.
        Positions: text blocks (causal) take consecutive positions from the context's rope; image
        blocks (non-causal) put every token at the context's rope.
        """
        b, t, _ = x.shape
        assert len(contexts) == b, "one context per batch row"
        for ctx in contexts:
            assert ctx.length == ctx.cache.length, "a block must follow its cache's committed end"
            assert ctx.length + t <= ctx.cache.capacity, "no room after the context: reserve first"
        assert len({id(ctx.cache) for ctx in contexts}) == b, "two rows cannot write into one cache"
        offsets = (
            torch.arange(t, device=x.device) if causal else torch.zeros(t, dtype=torch.long, device=x.device)
        )
        # Python ints added on the device: no host-to-device copy (which would block) per forward.
        positions = torch.stack([offsets + ctx.rope for ctx in contexts])  # (B, T)
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        kernel = IMPLEMENTATIONS[self.attn_impl]
        pre, post = self.regions.for_block(t, image=gen is not None)
        for index, layer in enumerate(self.model.layers):
            q, k, v = pre(layer, x, cos, sin, gen)  # (B, H, T, D), (B, G, T, D), (B, G, T, D)
            outs = []
            for row, ctx in enumerate(contexts):
                cache, n = ctx.cache, ctx.length
                cache.write(index, n, k[row], v[row])
                keys, values = cache.keys(index, n + t), cache.values(index, n + t)  # (G, n+T, D)
                outs.append(kernel(q[row : row + 1], keys[None], values[None], causal))
            x = post(layer, x, outs[0] if b == 1 else torch.cat(outs, dim=0), gen)  # (B, T, E)
        return route(x, gen, self.model.norm, self.model.norm_moe_gen)
