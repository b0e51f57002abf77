"""An explicit KV cache: preallocated per context, appended in place, snapshotted as prefixes.

Shapes: L=layers, G=kv heads, C=capacity (tokens), D=head_dim, T=tokens.

One `KVCache` holds the keys and values of one growing context (keys stored after k_norm and
RoPE, as the reference stores them) and the next RoPE position. Appending writes into spare
capacity. A job sizes its caches once from its budget (model/generation/budget.py), so the storage never moves
mid-job (no copy, no second allocation); if a budget was short the storage doubles,
still amortised O(1) per token instead of the reference's O(n) reallocation per call
(`reallocations` counts it). A `Prefix` is a read-only view of a cache's first
tokens: BAGEL's text-unconditional context is always a prefix of the conditional one (the
conditional context only ever appends), so it is a `Prefix` of the same memory, not a copy.
`fork()` copies a context when two futures must diverge.

A forward writes its block's keys and values right after each context (model/network/decoder.py), so a
context read by a forward must end where its cache ends. `branch_rooms` gives each guidance
branch such a context once per image: a branch that ends at its cache's end writes into the
cache's spare room (uncommitted, so nothing changes); a prefix of a cache another branch uses is
copied once, so no step copies a whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        # Zero-filled: the unused part never holds non-finite garbage (a masked kernel that reads
        # it multiplies it by a zero weight).
        self.k = torch.zeros(
            num_layers, kv_heads, capacity, head_dim, dtype=dtype, device=device
        )  # (L, G, C, D)
        self.v = torch.zeros_like(self.k)  # (L, G, C, D)
        self.length = 0  # tokens written and committed
        self.rope = 0  # RoPE position of the next token
        self.reallocations = 0  # times `reserve` had to grow the storage (0 in a well-sized job)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def cache(self) -> KVCache:
        return self

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more tokens after `length`, doubling the storage if needed."""
        need = self.length + extra
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity)
        grown_k = self.k.new_zeros(*self.k.shape[:2], new_cap, self.k.shape[3])  # (L, G, C', D)
        grown_v = torch.zeros_like(grown_k)
        grown_k[:, :, : self.length] = self.k[:, :, : self.length]
        grown_v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = grown_k, grown_v
        self.reallocations += 1

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer's new keys/values (G, T, D) at [start, start + T). `reserve` first."""
        end = start + k.shape[1]
        assert end <= self.capacity, "KVCache.write past capacity: call reserve() before the forward"
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v

    def keys(self, layer: int, end: int) -> torch.Tensor:
        return self.k[layer, :, :end]  # (G, end, D), a view

    def values(self, layer: int, end: int) -> torch.Tensor:
        return self.v[layer, :, :end]  # (G, end, D), a view

    def advance(self, tokens: int, positions: int) -> None:
        """Commit `tokens` written after `length`; the next token's RoPE position moves by `positions`."""
        assert self.length + tokens <= self.capacity, "advance past what was written"
        self.length += tokens
        self.rope += positions

    def truncate(self, length: int, rope: int) -> None:
        """Drop everything after the first `length` tokens (a decode scratch area, say)."""
        assert 0 <= length <= self.length, f"cannot truncate a cache of {self.length} tokens to {length}"
        self.length, self.rope = length, rope

    def snapshot(self) -> Prefix:
        """A read-only view of the cache as it is now; later appends do not change it."""
        return Prefix(self, self.length, self.rope)

    def fork(self) -> KVCache:
        """An independent copy of the committed tokens."""
        other = KVCache.__new__(KVCache)
        other.k = self.k[:, :, : max(self.length, 1)].clone()
        other.v = self.v[:, :, : max(self.length, 1)].clone()
        other.length, other.rope = self.length, self.rope
        other.reallocations = 0
        return other

    def nbytes(self) -> int:
        return self.k.element_size() * self.k.numel() * 2


@dataclass(frozen=True)
class Prefix:
    """The first `length` tokens of `cache`, whose next RoPE position is `rope`."""

    cache: KVCache
    length: int
    rope: int

    def __post_init__(self):
        assert self.length <= self.cache.length, "a prefix cannot be longer than its cache"

    def snapshot(self) -> Prefix:
        return self


Context = KVCache | Prefix  # anything a generation branch can read: .cache, .length, .rope


def branch_rooms(contexts: list[Context], tokens: int) -> list[Prefix]:
    """For each context a Prefix with `tokens` free slots right after it, private to that branch.

    The first branch on a cache that ends at the cache's end uses the cache's own spare room (the
    block is written there and never committed). Any other branch (a prefix that stops earlier, or
    a second branch on the same cache) reads a copy of its tokens, made once here.
    """
    rooms, claimed = [], set()
    for ctx in contexts:
        cache = ctx.cache
        if id(cache) not in claimed and ctx.length == cache.length:
            claimed.add(id(cache))
            cache.reserve(tokens)
            rooms.append(Prefix(cache, ctx.length, ctx.rope))
            continue
        n = ctx.length
        copy = KVCache(
            *cache.k.shape[:2],
            cache.k.shape[3],
            capacity=n + tokens,
            dtype=cache.k.dtype,
            device=cache.k.device,
        )
        copy.k[:, :, :n] = cache.k[:, :, :n]
        copy.v[:, :, :n] = cache.v[:, :, :n]
        copy.advance(n, ctx.rope)
        rooms.append(Prefix(copy, n, ctx.rope))
    return rooms
