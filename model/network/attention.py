"""Attention semantics in one reference function, and the fast kernel that must agree with it.

Shapes: B=batch, H=query heads, G=kv heads (H % G == 0), Tq=queries, Tk=keys (the cached context
plus the new block, so Tk >= Tq), D=head_dim.

Causal masking is aligned bottom-right, as flash-attn >= 2.1 does for BAGEL: query i of a block of
Tq queries sees every key j <= i + (Tk - Tq), i.e. the whole cache plus the block up to itself.
(PyTorch's `is_causal=True` is top-left aligned when Tq != Tk, which would be wrong for a prefill
after a cached context.) Non-causal blocks (images) see every key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) bool, True where a query may attend: key j <= query i + (Tk - Tq)."""
    rows = torch.arange(tq, device=device)[:, None]
    cols = torch.arange(tk, device=device)[None, :]
    return cols <= rows + (tk - tq)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Plain softmax attention in float32. q (B, H, Tq, D), k and v (B, G, Tk, D) -> (B, H, Tq, D)."""
    _, h, tq, d = q.shape
    g, tk = k.shape[1], k.shape[2]
    k = k.float().repeat_interleave(h // g, dim=1)  # (B, H, Tk, D)
    v = v.float().repeat_interleave(h // g, dim=1)  # (B, H, Tk, D)
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, Tq, Tk)
    if causal:
        scores = scores.masked_fill(~causal_mask(tq, tk, q.device), float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)  # (B, H, Tq, D)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """The same semantics through torch's scaled_dot_product_attention (flash / efficient kernels).

    Every kernel it picks computes the scores and the softmax in float32 for bf16/fp16 inputs (flash
    and memory-efficient accumulate in float32; the math fallback upcasts unless
    `allow_fp16_bf16_reduction_math_sdp` is turned on, which nothing here does).

    Square causal blocks and non-causal blocks need no mask, so on CUDA they run the flash kernel
    with grouped heads (`enable_gqa`, no copy of keys or values); a single decoded token sees
    everything; only a causal prefill after a cache needs an explicit bottom-right mask. Masked
    kernels do not take `enable_gqa`, so there the query heads of a group are folded into the
    query axis (a reshape of q, and the (Tq, Tk) mask repeated per head) instead of repeating the
    keys and values H/G times.
    """
    b, h, tq, d = q.shape
    g, tk = k.shape[1], k.shape[2]
    if causal and tq > 1 and tq != tk:
        mask = causal_mask(tq, tk, q.device)  # (Tq, Tk)
        if h == g:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # query head gi*(H/G) + j of query i -> row j*Tq + i of group gi: (B, G, H/G*Tq, D)
        qg = q.reshape(b, g, (h // g) * tq, d)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(h // g, 1))
        return out.view(b, h, tq, d)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and tq > 1, enable_gqa=h != g)


IMPLEMENTATIONS = {"reference": attention_reference, "sdpa": attention_sdpa}
