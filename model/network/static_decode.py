"""One-token decode steps with static shapes on a decode arena of their own: replayed as CUDA graphs on
GPU (captured once per length bucket and kept across jobs), run as-is elsewhere.

Shapes: L=layers, H=query heads, G=kv heads, C=arena capacity, S=length bucket (S <= C),
D=head_dim, E=hidden, V=vocabulary.

Decoding one token is memory-bound on a GPU (read the weights once), but an eager step launches
about 70 kernels per layer from Python, which costs more than the memory traffic. Here a step reads
its token, position and slot from small device buffers, writes its keys and values into the arena
with `index_copy_`, and attends over the first S slots, where S is a length bucket just above the
live length (multiples of a granule that grows with the length, so padding stays under ~1/8 and a
job needs few buckets). With no shape depending on the step, each bucket's step is captured once
as a CUDA graph and replayed per token; on the CPU (or with `use_graph=False`) the very same
`_forward` runs eagerly, which is how the tests check it.

The arena: a text stage starts with `begin(cache, tokens)`, which copies the context's keys and
values into the decoder's own storage (one device copy: BAGEL's 9.5k-token refine context is
0.55 GB, ~0.4 ms on an H100) and decodes there, never into the job's cache. Nothing is lost: a
text stage ends, as the reference does, by re-prefilling the decoded text as T(text), so the
decode's own keys are scratch. The graphs bind to the arena, which outlives jobs, so a job replays
the graphs earlier jobs captured; the arena grows (to a power of two, and the graphs are captured
again) only when a context does not fit.

Attention over the bucket (`kernel`):
- "flex": flex attention with a block mask whose live-block count is set on the device each step
  (model/network/attention.py): no dense mask, only the live blocks are read, split over the keys
  by the flex decoding kernel. Compiled kernels on CUDA (with the engine's compiled regions);
  flex's eager form on the CPU, for the tests.
- "mask": SDPA with a (1, S) validity mask: the fallback where nothing is compiled (flex's eager
  form would compute every score of the bucket).
In both, the query heads of a group are read against their kv head without copying keys or
values, and scores and softmax are float32 (attention.py says why).

Capture binds every CUDA object to the arena's device (not the process's current device) and skips
`torch.cuda.graph`'s gc + empty_cache, which would throw away the allocator's cached blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from strokes.model.network.attention import DECODE_BLOCK, decode_block_mask, decode_flex
from strokes.model.network.bagel import Bagel
from strokes.model.network.decoder import rope_tables
from strokes.model.network.kv_cache import KVCache

MIN_BUCKET = 256  # slots; a multiple of flex's key block; keeps the mask's rows 16-element aligned
MIN_ARENA = 2048  # slots of the smallest arena
KERNELS = ("flex", "mask")


def length_bucket(needed: int, capacity: int) -> int:
    """The smallest bucket holding `needed` slots: a multiple of a granule (MIN_BUCKET, doubled
    while under needed/16, so the padding stays under needed/8), capped at the capacity."""
    granule = MIN_BUCKET
    while granule * 16 < needed:
        granule *= 2
    return min(capacity, -(-needed // granule) * granule)


def arena_capacity(needed: int) -> int:
    """The arena's slots for a context of `needed` slots: a power of two, at least MIN_ARENA."""
    return max(MIN_ARENA, 1 << (needed - 1).bit_length())


class StaticDecoder:
    def __init__(self, model: Bagel, use_graph: bool, kernel: str = "mask", compiled: bool = False):
        if kernel not in KERNELS:
            raise ValueError(f"decode kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.model, self.kernel, self.compiled = model, kernel, compiled
        cfg = model.cfg.llm
        self.layers, self.groups, self.per_group, self.head_dim = (
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.num_heads // cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.device = device = model.device
        self.dtype = model.dtype
        self.token = torch.zeros(1, dtype=torch.long, device=device)  # the input token id
        self.position = torch.zeros(1, 1, dtype=torch.long, device=device)  # its RoPE position
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # its slot in the arena
        self.live_blocks = torch.ones(1, 1, 1, dtype=torch.int32, device=device)  # flex: key blocks read
        self.k = self.v = self.slots = None  # the arena (L, G, C, D) each, and its slot numbers (C,)
        self.capacity = 0
        self.length = self.rope = 0  # the arena's live tokens and the next RoPE position
        self.arena_allocations = 0
        self.use_graph = use_graph and device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, logits)
        self.masks: dict[int, object] = {}  # bucket -> flex block mask
        self.captures = 0

    def _allocate(self, needed: int) -> None:
        self.graphs.clear()  # they read the old storage
        self.masks.clear()
        self.capacity = arena_capacity(needed)
        shape = (self.layers, self.groups, self.capacity, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)  # (L, G, C, D)
        self.v = torch.zeros_like(self.k)
        self.slots = torch.arange(self.capacity, device=self.device)  # (C,)
        self.arena_allocations += 1

    def begin(self, cache: KVCache, tokens: int) -> Callable[[int], torch.Tensor]:
        """Start decoding after `cache`'s committed tokens, with room for `tokens` steps; returns
        `step`. The cache itself is only read."""
        n = cache.length
        if n + tokens > self.capacity:
            self._allocate(n + tokens)
        self.k[:, :, :n].copy_(cache.k[:, :, :n])
        self.v[:, :, :n].copy_(cache.v[:, :, :n])
        self.length, self.rope, self.limit = n, cache.rope, n + tokens
        return self.step

    def _attend(self, bucket: int, layer: int, q, k, v) -> torch.Tensor:
        """q (1, H, 1, D), k and v (1, G, 1, D) -> (1, H, 1, D), writing k, v into the arena."""
        keys, values = self.k[layer], self.v[layer]  # (G, C, D)
        keys.index_copy_(1, self.index, k[0])
        values.index_copy_(1, self.index, v[0])
        if self.kernel == "flex":
            out = decode_flex(
                q, keys[None, :, :bucket], values[None, :, :bucket], self.masks[bucket], self.compiled
            )
            return out  # (1, H, 1, D)
        qg = q.view(1, self.groups, self.per_group, self.head_dim)  # (1, G, H/G, D), a view
        valid = (self.slots[:bucket] <= self.index)[None]  # (1, S): the context and this token
        out = F.scaled_dot_product_attention(
            qg, keys[None, :, :bucket], values[None, :, :bucket], attn_mask=valid
        )  # (1, G, H/G, D)
        return out.view(1, -1, 1, self.head_dim)  # (1, H, 1, D)

    def _forward(self, bucket: int) -> torch.Tensor:
        lm = self.model.language_model
        if self.kernel == "flex":
            if bucket not in self.masks:
                self.masks[bucket] = decode_block_mask(bucket, self.index, self.live_blocks)
            self.live_blocks.copy_((self.index // DECODE_BLOCK + 1).view(1, 1, 1))
        x = self.model.embed_tokens(self.token)[None]  # (1, 1, E)
        cos, sin = rope_tables(self.position, lm.cfg.head_dim, lm.cfg.rope_theta, x.dtype)
        pre, post = lm.regions.for_block(1, image=False)
        for index, layer in enumerate(lm.model.layers):
            q, k, v = pre(layer, x, cos, sin, None)
            x = post(layer, x, self._attend(bucket, index, q, k, v), None)
        return self.model.logits(lm.model.norm(x)[0, -1])  # (V,)

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up and capture the bucket's step on a side stream of the arena's device."""
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
        """Feed `token` after the arena's live tokens, keep it, return the next-token logits (V,)."""
        assert self.length < self.limit, "more steps than `begin` made room for"
        self.token.fill_(token)
        self.position.fill_(self.rope)
        self.index.fill_(self.length)
        bucket = length_bucket(self.length + 1, self.capacity)
        if not self.use_graph:
            logits = self._forward(bucket)
        else:
            if bucket not in self.graphs:
                self.graphs[bucket] = self._capture(bucket)
            graph, out = self.graphs[bucket]
            graph.replay()
            logits = out.clone()
        self.length += 1
        self.rope += 1
        return logits
