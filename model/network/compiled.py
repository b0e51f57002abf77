"""Regional compilation of the decoder: the two regions of a layer compiled once, shared by every layer.

Shapes: B=batch, T=tokens of the block, E=hidden, H=query heads, G=kv heads, D=head_dim.

A decoder layer is split around its cache-aware attention (model/network/decoder.py): `attention_inputs`
(input RMSNorm, q/k/v projections, float32 q/k RMSNorm, RoPE) and `finish` (o_proj, residual,
post-attention RMSNorm, SwiGLU MLP, residual). Everything element-wise sits in one of the two, so
inductor fuses RMSNorm, the q/k norm, RoPE and SwiGLU into the kernels around the matmuls: the
float32 intermediates the reference computes stay in registers instead of going through memory.
The attention itself (cache writes, SDPA / flex) stays eager between them, as vLLM's piecewise
compilation does, so the cache and the attention backends need nothing from the compiler.

Dynamo traces each region once for all layers (a layer's parameters are graph inputs, not
constants: one graph, 28 uses). Shapes:
- `static` regions (dynamic=False): decode steps (T = 1) and image blocks (T fixed per image
  size and branch count) get one graph per shape, a handful per worker;
- `dynamic` regions (dynamic=True): text and ViT blocks, whose length changes with every prompt,
  share one graph with a symbolic T.

Compiled artifacts (inductor's FX graph cache, AOTAutograd's cache, Triton's kernels) go to
`CompileOptions.cache_dir` when given, so a restarted worker finds them on disk and its warm-up
only traces (seconds) instead of compiling again. `Regions()` is the plain eager path (the default,
and what training reuses): the same methods, called directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

RECOMPILE_LIMIT = 64  # static graphs per region: decode, and image blocks of each size and branch count


@dataclass(frozen=True)
class CompileOptions:
    """How the decoder is compiled (`load_engine(compile=...)`, `strokes worker --compile`)."""

    cache_dir: str | None = (
        None  # inductor/Triton caches on disk; None: torch's default (/tmp/torchinductor_*)
    )
    mode: str | None = None  # torch.compile mode: None (default) or "max-autotune-no-cudagraphs"
    backend: str = "inductor"  # "aot_eager": traced but not code-generated (the device check's dry run)


# The regions as plain functions of (layer, tensors): one code object each, so one trace per shape
# covers every layer. Separate functions for the static and the dynamic variant: dynamo keeps its
# compiled entries per code object.
def _pre_static(layer, x, cos, sin, gen):
    return layer.attention_inputs(x, cos, sin, gen)


def _post_static(layer, x, attended, gen):
    return layer.finish(x, attended, gen)


def _pre_dynamic(layer, x, cos, sin, gen):
    return layer.attention_inputs(x, cos, sin, gen)


def _post_dynamic(layer, x, attended, gen):
    return layer.finish(x, attended, gen)


def _pre_eager(layer, x, cos, sin, gen):
    return layer.attention_inputs(x, cos, sin, gen)


def _post_eager(layer, x, attended, gen):
    return layer.finish(x, attended, gen)


Pre = Callable  # (layer, x (B, T, E), cos, sin (B, 1, T, D), gen) -> q (B, H, T, D), k, v (B, G, T, D)
Post = Callable  # (layer, x (B, T, E), attended (B, H, T, D), gen) -> x (B, T, E)


def use_cache_dir(path: str | Path) -> Path:
    """Point inductor's and Triton's on-disk caches at `path` (created), before anything compiles."""
    folder = Path(path).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compile cache_dir {folder}: cannot create it ({e.strerror or e})") from e
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return folder


class Regions:
    """The two regions of every layer for a block of `tokens` tokens: eager, or compiled."""

    def __init__(self, options: CompileOptions | None = None):
        self.options = options
        if options is None:
            self.static = self.dynamic = (_pre_eager, _post_eager)
            return
        if options.cache_dir:
            use_cache_dir(options.cache_dir)
        import torch._dynamo.config as dynamo_config

        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, RECOMPILE_LIMIT)
        if hasattr(dynamo_config, "recompile_limit"):
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        mode, backend = options.mode, options.backend

        def compiled(fn, dynamic: bool):
            return torch.compile(fn, dynamic=dynamic, mode=mode, backend=backend, fullgraph=True)

        self.static = (compiled(_pre_static, False), compiled(_post_static, False))
        self.dynamic = (compiled(_pre_dynamic, True), compiled(_post_dynamic, True))

    @property
    def compiled(self) -> bool:
        return self.options is not None

    def for_block(self, tokens: int, image: bool) -> tuple[Pre, Post]:
        """Decode steps and image blocks: static shapes; any other block: a symbolic length."""
        return self.static if tokens == 1 or image else self.dynamic
