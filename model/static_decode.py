"""One-token decode steps with static shapes, replayed as a CUDA graph on GPU.

Shapes: L=layers, H=query heads, G=kv heads, C=cache capacity, D=head_dim, E=hidden, V=vocabulary.

Decoding one token is memory-bound on a GPU (read the weights once), but an eager step launches
about 70 kernels per layer from Python, which costs more than the memory traffic. Here a step reads
its token, position and cache index from small device buffers, writes its keys and values into the
cache with `index_copy_`, and attends over the cache's whole capacity behind a validity mask; with
no shape depending on the step, the whole step is captured once as a CUDA graph and replayed per
token. The attention is the same math as model/attention.py for one query: grouped heads are a
view (query head h reads kv head h // (H/G)), so no key or value is copied.

A decoder is bound to one cache storage: a cache that grows (reallocates) needs a new one, so
`bind` reserves the room for the whole decode first.
"""

from __future__ import annotations

import math

import torch

from model.bagel import Bagel
from model.decoder import rope_tables
from model.kv_cache import KVCache


class StaticDecoder:
    def __init__(self, model: Bagel, cache: KVCache, use_graph: bool):
        self.model, self.cache = model, cache
        cfg = model.cfg.llm
        self.groups, self.per_group, self.head_dim = (
            cfg.num_kv_heads,
            cfg.num_heads // cfg.num_kv_heads,
            cfg.head_dim,
        )
        device = cache.k.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)  # the input token id
        self.position = torch.zeros(1, 1, dtype=torch.long, device=device)  # its RoPE position
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # where its K/V go in the cache
        self.slots = torch.arange(cache.capacity, device=device)  # (C,)
        self.storage = cache.k.data_ptr()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.use_graph = use_graph and device.type == "cuda"
        self.captured = False

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, 1, D), k and v (1, G, 1, D) -> (1, H, 1, D), writing k, v into the cache."""
        keys, values = self.cache.k[layer], self.cache.v[layer]  # (G, C, D)
        keys.index_copy_(1, self.index, k[0])
        values.index_copy_(1, self.index, v[0])
        qg = q[0, :, 0].reshape(self.groups, self.per_group, self.head_dim)  # (G, H/G, D)
        scores = qg @ keys.transpose(1, 2) / math.sqrt(self.head_dim)  # (G, H/G, C)
        scores = scores.float().masked_fill(self.slots > self.index, float("-inf"))
        out = scores.softmax(dim=-1).to(values.dtype) @ values  # (G, H/G, D)
        return out.reshape(1, -1, 1, self.head_dim)  # (1, H, 1, D)

    def _forward(self) -> torch.Tensor:
        lm = self.model.language_model
        x = self.model.embed_tokens(self.token)[None]  # (1, 1, E)
        cos, sin = rope_tables(self.position, lm.cfg.head_dim, lm.cfg.rope_theta, x.dtype)
        for index, layer in enumerate(lm.model.layers):
            x = layer(x, cos, sin, None, lambda q, k, v, index=index: self._attend(index, q, k, v))
        return self.model.logits(lm.model.norm(x)[0, -1])  # (V,)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (allocator, cuBLAS handles) off the capture
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Feed `token` at the cache's end, commit it, return the next-token logits (V,)."""
        cache = self.cache
        assert cache.k.data_ptr() == self.storage, "the cache was reallocated: bind a new StaticDecoder"
        assert cache.length < cache.capacity, "no room left: reserve before binding"
        self.token.fill_(token)
        self.position.fill_(cache.rope)
        self.index.fill_(cache.length)
        if not self.use_graph:
            logits = self._forward()
        else:
            if not self.captured:
                self._capture()
                self.captured = True
            self.graph.replay()
            logits = self.logits.clone()
        cache.advance(1, 1)
        return logits
