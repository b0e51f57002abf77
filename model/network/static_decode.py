"""One-token decode steps with static shapes: replayed as CUDA graphs on GPU, run as-is elsewhere.

Shapes: L=layers, H=query heads, G=kv heads, C=cache capacity, S=length bucket (S <= C),
D=head_dim, E=hidden, V=vocabulary.

Decoding one token is memory-bound on a GPU (read the weights once), but an eager step launches
about 70 kernels per layer from Python, which costs more than the memory traffic. Here a step reads
its token, position and cache index from small device buffers, writes its keys and values into the
cache with `index_copy_`, and attends over the first S slots of the cache behind a validity mask,
where S is a length bucket just above the live length (multiples of a granule that grows with the
length, so padding stays under ~1/8 and a job needs few buckets). With no shape depending on the
step, each bucket's step is captured once as a CUDA graph and replayed per token; on the CPU (or
with `use_graph=False`) the very same `_forward` runs eagerly, which is how the tests check it.

Attention: the query heads of a group are folded into the query axis (a view: query head h reads
kv head h // (H/G)), so no key or value is copied or repeated; scores and softmax run in float32
inside scaled_dot_product_attention (model/network/attention.py says why), never as a bf16 matmul.

A decoder is bound to one cache storage (its graphs read those addresses): the engine keeps one per
job's cache and reuses it, with its graphs, across the job's text stages. Capture binds every CUDA
object to the cache's device (not the process's current device) and skips `torch.cuda.graph`'s
gc + empty_cache, which would throw away the allocator's cached blocks at every capture.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from strokes.model.network.bagel import Bagel
from strokes.model.network.decoder import rope_tables
from strokes.model.network.kv_cache import KVCache

MIN_BUCKET = 256  # slots; also keeps the mask's rows 16-element aligned for the CUDA kernels


def length_bucket(needed: int, capacity: int) -> int:
    """The smallest bucket holding `needed` slots: a multiple of a granule (MIN_BUCKET, doubled
    while under needed/16, so the padding stays under needed/8), capped at the capacity."""
    granule = MIN_BUCKET
    while granule * 16 < needed:
        granule *= 2
    return min(capacity, -(-needed // granule) * granule)


class StaticDecoder:
    def __init__(self, model: Bagel, cache: KVCache, use_graph: bool):
        self.model = model
        self._cache = weakref.ref(cache)  # a finished job's cache must not be kept alive by us
        self.capacity = cache.capacity
        cfg = model.cfg.llm
        self.groups, self.per_group, self.head_dim = (
            cfg.num_kv_heads,
            cfg.num_heads // cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.device = device = cache.k.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)  # the input token id
        self.position = torch.zeros(1, 1, dtype=torch.long, device=device)  # its RoPE position
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # where its K/V go in the cache
        self.slots = torch.arange(cache.capacity, device=device)  # (C,)
        self.storage = cache.k.data_ptr()
        self.use_graph = use_graph and device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, logits)
        self.captures = 0

    def bound_to(self, cache: KVCache) -> bool:
        return self._cache() is cache and cache.k.data_ptr() == self.storage

    def _attend(self, cache: KVCache, bucket: int, layer: int, q, k, v) -> torch.Tensor:
        """q (1, H, 1, D), k and v (1, G, 1, D) -> (1, H, 1, D), writing k, v into the cache."""
        keys, values = cache.k[layer], cache.v[layer]  # (G, C, D)
        keys.index_copy_(1, self.index, k[0])
        values.index_copy_(1, self.index, v[0])
        qg = q.view(1, self.groups, self.per_group, self.head_dim)  # (1, G, H/G, D), a view
        valid = (self.slots[:bucket] <= self.index)[None]  # (1, S): the context and this token
        out = F.scaled_dot_product_attention(
            qg, keys[None, :, :bucket], values[None, :, :bucket], attn_mask=valid
        )  # (1, G, H/G, D)
        return out.view(1, -1, 1, self.head_dim)  # (1, H, 1, D)

    def _forward(self, bucket: int) -> torch.Tensor:
        cache = self._cache()
        lm = self.model.language_model
        x = self.model.embed_tokens(self.token)[None]  # (1, 1, E)
        cos, sin = rope_tables(self.position, lm.cfg.head_dim, lm.cfg.rope_theta, x.dtype)
        for index, layer in enumerate(lm.model.layers):
            x = layer(x, cos, sin, None, lambda q, k, v, i=index: self._attend(cache, bucket, i, q, k, v))
        return self.model.logits(lm.model.norm(x)[0, -1])  # (V,)

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up and capture the bucket's step on a side stream of the cache's device."""
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # allocator blocks, cuBLAS workspaces, lazy kernel loading
                    self._forward(bucket)
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin()  # private memory pool; no gc, no empty_cache
                try:
                    logits = self._forward(bucket)
                finally:
                    graph.capture_end()
            torch.cuda.current_stream(self.device).wait_stream(side)
        self.captures += 1
        return graph, logits

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Feed `token` at the cache's end, commit it, return the next-token logits (V,)."""
        cache = self._cache()
        assert cache is not None and self.bound_to(cache), "the cache was reallocated: bind a new decoder"
        assert cache.length < cache.capacity, "no room left: reserve before binding"
        self.token.fill_(token)
        self.position.fill_(cache.rope)
        self.index.fill_(cache.length)
        bucket = length_bucket(cache.length + 1, self.capacity)
        if not self.use_graph:
            logits = self._forward(bucket)
        else:
            if bucket not in self.graphs:
                self.graphs[bucket] = self._capture(bucket)
            graph, out = self.graphs[bucket]
            graph.replay()
            logits = out.clone()
        cache.advance(1, 1)
        return logits
