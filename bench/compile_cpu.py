"""Compiled vs eager decoder layers on the CPU (inductor's C++ backend): a first signal for the fusion
of RMSNorm, q/k norm, RoPE and SwiGLU (model/network/compiled.py), and the warm-up it costs with
and without the on-disk cache.

On the shared "small" checkpoint (bench/common.py), float32, one torch thread, in lockstep (eager
and compiled alternate, median of the repetitions):
- image block: one branch's denoising forward of a 256^2 image (258 tokens, generation expert)
  after a short text context;
- prefill: a 128-token causal text block after 64 cached tokens (the symbolic-length region);
- decode step: one token through the static decoder (T = 1).
Warm-up: the seconds of the first compiled pass over the three, cold (empty cache folder) and
warm (the same folder after torch._dynamo.reset(), as a restarted worker finds it).
The GPU ratio is what matters (the device check measures it); on the CPU the element-wise work is
a smaller share of a forward than on an H100, so this ratio understates it.

Usage: python bench/compile_cpu.py [--json bench/results/compile_cpu.json] [--reps 9]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings

import torch
from common import (
    Interference,
    log,
    machine,
    median,
    setup_threads,
    small_checkpoint,
    small_sizes,
    wait_for_quiet,
    write_json,
)

from strokes.model.generation.loading import load_engine
from strokes.model.network.compiled import CompileOptions
from strokes.model.network.kv_cache import branch_rooms
from strokes.model.network.static_decode import StaticDecoder
from strokes.model.network.transforms import latent_position_ids


def workloads(engine) -> dict:
    """name -> a function running one forward of that kind."""
    lm, cfg = engine.model.language_model, engine.cfg
    context = engine.new_cache(1024)
    engine.append_ids(context, list(range(5, 69)))  # 64 cached tokens
    h = w = 256 // cfg.latent_downsample
    n = h * w
    x = torch.randn(n, cfg.patch_latent_dim, generator=torch.Generator().manual_seed(0))
    block = engine.image_block(
        engine.model.embed_latents(x, 0.5, latent_position_ids(h, w, cfg.max_latent_size))
    )
    room = branch_rooms([context], n + 2)
    gen = slice(1, n + 1)
    text = engine.model.embed_tokens(torch.arange(5, 133))[None]  # (1, 128, E)
    decode_cache = engine.new_cache(1024)
    engine.append_ids(decode_cache, list(range(5, 69)))
    decoder = StaticDecoder(engine.model, use_graph=False)

    def image():
        lm.forward_block(block, room, gen=gen)

    def prefill():
        context.reserve(128)
        lm.forward_block(text, [context], causal=True)

    def decode():
        decoder.begin(decode_cache, 1)(7)  # copies the 64 cached tokens into its arena, then one step

    return {"image_block_ms": image, "prefill_128_ms": prefill, "decode_step_ms": decode}


def warmup_seconds(engine, options: CompileOptions) -> float:
    engine.model.language_model.compile_regions(options)
    fns = workloads(engine)
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()
    return round(time.perf_counter() - t0, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    setup_threads(1)
    engine = load_engine(small_checkpoint(), device="cpu", dtype=torch.float32)
    quiet = wait_for_quiet()
    busy = Interference().start()
    result = {
        "benchmark": "compile_cpu",
        "sizes": small_sizes(),
        "machine": machine(),
        "quiet": quiet,
        "reps": args.reps,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as cache, torch.inference_mode():
        options = CompileOptions(cache_dir=cache)
        log("compiling (cold cache) ...")
        cold = warmup_seconds(engine, options)
        torch._dynamo.reset()
        log("compiling again (warm cache, after a dynamo reset) ...")
        warm = warmup_seconds(engine, options)
        result["warmup_s"] = {"cold_cache": cold, "warm_cache": warm}
        lm = engine.model.language_model
        regions = {"compiled": lm.regions}  # the warm one, reused (a new wrapper would trace again)
        lm.compile_regions(None)
        regions["eager"] = lm.regions
        fns = workloads(engine)
        times = {name: {"eager": [], "compiled": []} for name in fns}
        log("timing ...")
        for r in range(args.reps):
            for name, fn in fns.items():
                for kind in ("eager", "compiled")[:: 1 if r % 2 == 0 else -1]:
                    lm.regions = regions[kind]
                    t0 = time.perf_counter()
                    fn()
                    times[name][kind].append(time.perf_counter() - t0)
    result["ms"] = {
        name: {
            "eager": round(1e3 * median(t["eager"]), 3),
            "compiled": round(1e3 * median(t["compiled"]), 3),
            "eager_over_compiled": round(median(t["eager"]) / median(t["compiled"]), 3),
        }
        for name, t in times.items()
    }
    result["other_processes_busy_share"] = busy.stop()
    print(f"{'what':<18} {'eager ms':>10} {'compiled ms':>12} {'eager/compiled':>15}")
    for name, r in result["ms"].items():
        print(f"{name:<18} {r['eager']:>10.3f} {r['compiled']:>12.3f} {r['eager_over_compiled']:>15.3f}")
    w = result["warmup_s"]
    print(f"warm-up of the three: {w['cold_cache']} s cold, {w['warm_cache']} s from the on-disk cache")
    print(f"others busy: {result['other_processes_busy_share']:.0%} of the cores; torch threads 1")
    write_json(args.json, result)
    return 0 if all(math.isfinite(r["eager_over_compiled"]) for r in result["ms"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
