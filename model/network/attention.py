"""Attention semantics in one reference function, and the fast kernels that must agree with it.

Shapes: B=batch, H=query heads, G=kv heads (H % G == 0), Tq=queries, Tk=keys (the cached context
plus the new block, so Tk >= Tq), D=head_dim, S=a decode length bucket.

Causal masking is aligned bottom-right, as flash-attn >= 2.1 does for BAGEL: query i of a block of
Tq queries sees every key j <= i + (Tk - Tq), i.e. the whole cache plus the block up to itself.
(PyTorch's `is_causal=True` is top-left aligned when Tq != Tk, which would be wrong for a prefill
after a cached context.) Non-causal blocks (images) see every key.

Every kernel computes the scores and the softmax in float32 for bf16/fp16 inputs (flash, cuDNN and
memory-efficient accumulate in float32; the math fallback upcasts unless
`allow_fp16_bf16_reduction_math_sdp` is turned on, which nothing here does; flex attention's
kernels accumulate in float32). No path passes a dense mask on CUDA:
- an image block, a square causal block, a single decoded token: plain SDPA (`is_causal` for the
  square block), grouped heads through `enable_gqa` (no copy of keys or values);
- a causal prefill after a cache (Tq != Tk): `causal_lower_right`, which flash runs natively (its
  causal is bottom-right) with grouped heads, for bf16/fp16 on CUDA; elsewhere (the CPU, float32),
  where no fused kernel takes it, the query heads of a group are folded into the query axis behind
  a (Tq, Tk) mask instead (`prefill_folded`);
- the static decoder's step over a length bucket (model/network/static_decode.py): flex attention
  with a block mask whose live block count is a device tensor (`decode_block_mask`), so a CUDA
  graph replays it for every position of the bucket and only the live blocks are read.

Which SDPA backend runs each call on CUDA comes from a table measured on the device and kept in the
repository (attention_table.json beside this file, written by `bench/attention_table.py --install`):
per GPU model, dtype and shape kind, the backends in order of measured speed. A GPU or shape the
table does not cover leaves the choice to torch.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

TABLE_PATH = Path(__file__).with_name("attention_table.json")
BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
KINDS = ("image", "square", "prefill", "single")  # see `shape_kind`
DECODE_BLOCK = 128  # flex attention's key block: a decode bucket is a whole number of them


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


# ---- the backend table ---------------------------------------------------------------------------


def shape_kind(tq: int, tk: int, causal: bool) -> str:
    """image: non-causal block; square: causal, no cache; prefill: causal after a cache; single: one query."""
    if tq == 1:
        return "single"
    if not causal:
        return "image"
    return "square" if tq == tk else "prefill"


@dataclass(frozen=True)
class Rule:
    """Shapes of one kind up to (max_tq, max_tk) run the first backend of `backends` that can."""

    kind: str
    max_tq: int
    max_tk: int
    backends: tuple[str, ...]


@dataclass(frozen=True)
class BackendTable:
    gpu: str  # torch.cuda.get_device_name, e.g. "NVIDIA H100 80GB HBM3"
    dtype: str  # "bfloat16"
    rules: tuple[Rule, ...]  # the first that covers a shape decides

    def backends(self, kind: str, tq: int, tk: int) -> tuple[str, ...] | None:
        for rule in self.rules:
            if rule.kind == kind and tq <= rule.max_tq and tk <= rule.max_tk:
                return rule.backends
        return None


def parse_table(data: dict, source: str) -> list[BackendTable]:
    """The table file's JSON -> tables; a malformed entry fails naming the file and the field."""

    def need(obj: dict, key: str, kind: type, where: str):
        if not isinstance(obj, dict) or not isinstance(obj.get(key), kind):
            raise ValueError(f"{source}: {where}.{key} must be a {kind.__name__}")
        return obj[key]

    tables = []
    for i, entry in enumerate(need(data, "tables", list, "")):
        rules = []
        for j, rule in enumerate(need(entry, "rules", list, f"tables[{i}]")):
            where = f"tables[{i}].rules[{j}]"
            kind = need(rule, "kind", str, where)
            if kind not in KINDS:
                raise ValueError(f"{source}: {where}.kind must be one of {', '.join(KINDS)}, got {kind!r}")
            backends = tuple(need(rule, "backends", list, where))
            unknown = [b for b in backends if b not in BACKENDS]
            if unknown or not backends:
                raise ValueError(f"{source}: {where}.backends must name some of {', '.join(BACKENDS)}")
            rules.append(
                Rule(kind, need(rule, "max_tq", int, where), need(rule, "max_tk", int, where), backends)
            )
        tables.append(
            BackendTable(
                need(entry, "gpu", str, f"tables[{i}]"),
                need(entry, "dtype", str, f"tables[{i}]"),
                tuple(rules),
            )
        )
    return tables


@functools.cache
def load_tables(path: Path = TABLE_PATH) -> tuple[BackendTable, ...]:
    if not path.is_file():
        return ()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return tuple(parse_table(data, str(path)))


@functools.cache
def table_for(device: torch.device, dtype: torch.dtype) -> BackendTable | None:
    """The measured table of this GPU model and dtype, if the repository has one."""
    if device.type != "cuda":
        return None
    name, dtype_name = torch.cuda.get_device_name(device), str(dtype).removeprefix("torch.")
    return next((t for t in load_tables() if t.gpu == name and t.dtype == dtype_name), None)


_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


def _backend_context(q: torch.Tensor, kind: str, tq: int, tk: int):
    table = table_for(q.device, q.dtype) if q.is_cuda else None
    names = table.backends(kind, tq, tk) if table is not None else None
    if not names:
        return _NO_CONTEXT
    backends = [BACKENDS[n] for n in names]
    return sdpa_kernel(backends, set_priority=True) if _PRIORITY else sdpa_kernel(backends)


class _NoContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_CONTEXT = _NoContext()


# ---- SDPA ------------------------------------------------------------------------------------------


def prefill_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A causal block after a cache without a dense mask: q (B, H, Tq, D), k, v (B, G, Tk, D)."""
    tq, tk = q.shape[2], k.shape[2]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(tq, tk), enable_gqa=q.shape[1] != k.shape[1]
    )


def prefill_folded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The CPU's form of `prefill_lower_right`: a group's query heads folded into the query axis
    (a reshape of q; the (Tq, Tk) mask repeated per head) instead of repeating keys and values."""
    b, h, tq, d = q.shape
    g, tk = k.shape[1], k.shape[2]
    mask = causal_mask(tq, tk, q.device)  # (Tq, Tk)
    if h == g:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # query head gi*(H/G) + j of query i -> row j*Tq + i of group gi: (B, G, H/G*Tq, D)
    qg = q.reshape(b, g, (h // g) * tq, d)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(h // g, 1))
    return out.view(b, h, tq, d)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """The reference's semantics through torch's scaled_dot_product_attention, the backend of each
    shape from the measured table on CUDA. q (B, H, Tq, D), k and v (B, G, Tk, D) -> (B, H, Tq, D)."""
    tq, tk = q.shape[2], k.shape[2]
    kind = shape_kind(tq, tk, causal)
    with _backend_context(q, kind, tq, tk):
        if kind == "prefill":
            flash_dtype = q.dtype in (torch.bfloat16, torch.float16)  # flash runs bottom-right natively
            return prefill_lower_right(q, k, v) if q.is_cuda and flash_dtype else prefill_folded(q, k, v)
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=kind == "square", enable_gqa=q.shape[1] != k.shape[1]
        )


IMPLEMENTATIONS = {"reference": attention_reference, "sdpa": attention_sdpa}


# ---- the static decoder's step: flex attention over a length bucket ------------------------------


def decode_block_mask(bucket: int, index: torch.Tensor, live_blocks: torch.Tensor):
    """A block mask for one query over `bucket` key slots, of which slots <= index[0] are live.

    `live_blocks` (1, 1, 1) int32 is the number of key blocks the kernel reads; the caller sets it
    to index // DECODE_BLOCK + 1 on the device before each step, so later blocks are skipped and
    the mask function masks the rest of the last one. Both tensors are read at run time, so one
    mask (and one CUDA graph) serves every position of the bucket.
    """
    from torch.nn.attention.flex_attention import BlockMask

    assert bucket % DECODE_BLOCK == 0, f"a decode bucket must be a multiple of {DECODE_BLOCK} slots"
    blocks = bucket // DECODE_BLOCK
    indices = torch.arange(blocks, dtype=torch.int32, device=index.device).view(1, 1, 1, blocks)

    def live(b, h, q_idx, kv_idx):
        return kv_idx <= index[0]

    extra = (
        {"seq_lengths": (1, bucket)}
        if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters
        else {}
    )
    return BlockMask.from_kv_blocks(live_blocks, indices, BLOCK_SIZE=DECODE_BLOCK, mask_mod=live, **extra)


@functools.cache
def _flex_kernel(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True, fullgraph=True) if compiled else flex_attention


def decode_flex(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_mask, compiled: bool
) -> torch.Tensor:
    """q (1, H, 1, D), keys and values (1, G, S, D) -> (1, H, 1, D) over the block mask's live slots.
    `compiled`: the flex kernels (CUDA); else flex's eager form (the CPU's, for tests: it computes
    every score of the bucket, which is what the warning it gives says)."""
    kernel, gqa = _flex_kernel(compiled), q.shape[1] != keys.shape[1]
    if compiled:
        return kernel(q, keys, values, block_mask=block_mask, enable_gqa=gqa)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return kernel(q, keys, values, block_mask=block_mask, enable_gqa=gqa)
