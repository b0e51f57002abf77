"""Warm contexts: the KV caches of recently paused or finished runs, kept for forks and resumes.

A fork or a resume normally rebuilds its context by replaying the recorded stages (model/spec/forks.py):
every token and image of the prefix is prefilled again. When the worker still holds the caches of
a run whose recorded stages begin with the fork's, the replay starts from a copy of those caches
cut at the right stage boundary instead, and prefills nothing for that part. The copies are sized
from the forking job's budget, like a fresh job's caches, so they never grow mid-job.

Each kept entry has the run's caches as they were at its end, and for every stage boundary the
cache lengths and RoPE positions there (caches only ever append, so the first tokens of a longer
cache are exactly a shorter one's), the number of context items, and the logits after the last
text (the interleaved protocol chooses its next step from them). A stage is identified by a digest
of its record (iteration, stage, instruction, text, image, and the generator states after it), so
an edited stage never matches its original.

Budget: entries live on the engine's device up to `device_bytes`; beyond it the least recently
used move to host memory, up to `host_bytes`; beyond that they are dropped. On a CPU engine both
budgets are host memory. This module is the pipeline's; the service sets the budgets.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from strokes.model.generation.budget import Budget
from strokes.model.network.kv_cache import KVCache, Prefix


@dataclass(frozen=True)
class Boundary:
    """The contexts right after one stage."""

    cond: tuple[int, int]  # (length, rope)
    img_uncond: tuple[int, int]
    text_uncond: tuple[int, int]
    items: int  # context items added so far
    logits: torch.Tensor | None  # (V,) the prediction after the latest text, on the host


def stage_digest(record: dict[str, Any]) -> str:
    keep = ("iteration", "stage", "instruction", "text", "image", "appended_image", "rng", "rng_vae")
    body = json.dumps({k: record.get(k) for k in keep}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


@dataclass
class _Entry:
    key: str
    digests: list[str]
    boundaries: list[Boundary]
    cond: KVCache
    img_uncond: KVCache
    items: list  # the contexts' items (model.generation.contexts.ContextItem)
    nbytes: int
    on_device: bool


@dataclass
class Hit:
    """Contexts cut at a boundary: `stages` recorded stages are already in them."""

    stages: int
    cond: KVCache
    text_uncond: Prefix
    img_uncond: KVCache
    items: list
    last_logits: torch.Tensor | None
    boundaries: list[Boundary]  # of the stages it holds
    key: str


def _copy(cache: KVCache, length: int, rope: int, device: torch.device, capacity: int) -> KVCache:
    """An independent cache of the first `length` tokens, on `device`, with room for `capacity`
    (the forking job's budget): one allocation and one copy, never grown mid-job."""
    src_k, src_v = cache.k[:, :, :length], cache.v[:, :, :length]  # (L, G, n, D)
    out = KVCache(
        src_k.shape[0],
        src_k.shape[1],
        src_k.shape[3],
        capacity=max(capacity, length, 1),
        dtype=src_k.dtype,
        device=device,
    )
    out.k[:, :, :length] = src_k  # a host-to-device copy when the entry was moved to the host
    out.v[:, :, :length] = src_v
    out.advance(length, rope)
    return out


def _move(cache: KVCache, device: torch.device | str) -> None:
    cache.k, cache.v = cache.k.to(device), cache.v.to(device)


class WarmContexts:
    def __init__(self, device_bytes: int, host_bytes: int = 0):
        self.device_bytes, self.host_bytes = device_bytes, host_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # the worker's event loop asks `holds` while a run puts
        self.hits = self.misses = 0
        self.cpu_engine = False  # set by the first put: on a CPU engine both budgets are host memory

    def holds(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def put(self, key: str, records: list[dict], boundaries: list[Boundary], contexts) -> None:
        """Keep a run's contexts (not copied: the run is over) under `key`, within the budget."""
        nbytes = contexts.cond.nbytes() + contexts.img_uncond.nbytes()
        nbytes += sum(b.logits.numel() * b.logits.element_size() for b in boundaries if b.logits is not None)
        on_device = contexts.cond.k.device.type != "cpu"
        self.cpu_engine = not on_device
        entry = _Entry(
            key,
            [stage_digest(r) for r in records],
            list(boundaries),
            contexts.cond,
            contexts.img_uncond,
            list(contexts.items),
            nbytes,
            on_device,
        )
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = entry
            self._fit()

    def _fit(self) -> None:
        """Device entries over budget move to the host (oldest first); host ones are dropped."""
        device = [e for e in self._entries.values() if e.on_device]
        used = sum(e.nbytes for e in device)
        for e in device:
            if used <= self.device_bytes:
                break
            used -= e.nbytes
            _move(e.cond, "cpu")
            _move(e.img_uncond, "cpu")
            e.on_device = False
        host_budget = self.host_bytes + (self.device_bytes if self.cpu_engine else 0)
        host = [e for e in self._entries.values() if not e.on_device]
        used = sum(e.nbytes for e in host)
        for e in host:
            if used <= host_budget:
                break
            used -= e.nbytes
            del self._entries[e.key]

    def take(self, records: list[dict], device: torch.device, budget: Budget | None = None) -> Hit | None:
        """The longest warm prefix of `records` (the stages a fork replays), as fresh copies sized
        for the forking job's `budget` (model/generation/budget.py; None: exactly the prefix)."""
        digests = [stage_digest(r) for r in records]
        with self._lock:
            best, best_n = None, 0
            for entry in self._entries.values():
                n = 0
                for a, b in zip(entry.digests, digests, strict=False):
                    if a != b:
                        break
                    n += 1
                if n > best_n:
                    best, best_n = entry, n
            if best is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(best.key)
            b = best.boundaries[best_n - 1]
            cond = _copy(best.cond, *b.cond, device, budget.cond if budget else 0)
            img_uncond = _copy(best.img_uncond, *b.img_uncond, device, budget.img_uncond if budget else 0)
            return Hit(
                stages=best_n,
                cond=cond,
                text_uncond=Prefix(cond, *b.text_uncond),
                img_uncond=img_uncond,
                items=best.items[: b.items],
                last_logits=None if b.logits is None else b.logits.to(device),
                boundaries=best.boundaries[:best_n],
                key=best.key,
            )
