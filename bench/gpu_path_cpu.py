"""CPU ratios for what issue 14 changed on the batch-1 path, old way vs new way, in lockstep.

On the shared "small" configuration (DESIGN.md section 5, float32), torch limited to ONE thread
(other sessions share the machine's two cores). Each pair runs alternately, one repetition of
each at a time, so load from other processes hits both alike; medians are reported.

1. denoise: one guided denoising step (3 branches, batched) over an edit-like context (a 256^2
   image as VAE + ViT tokens, the prompts; text-uncond a prefix of cond). Old: each layer of each
   branch concatenates its whole cached context with the block (`torch.cat`), as forward_block
   did. New: each branch writes the block into room after its context (`branch_rooms`, set up once
   per image) and attends over a view.
2. decode: a static-shape decode step (the CUDA graph's step, run eagerly) with 700 tokens of
   context in a cache of 4096 slots. Old: attention over the whole capacity. New: over the length
   bucket just above the live length (768 slots).
3. prefill attention: a 64-token causal text block after 2048 cached tokens, every layer's
   attention call alone. Old: keys and values repeated per query head (repeat_interleave) for the
   masked kernel. New: the query heads of a group folded into the query axis.
4. cache growth: a 3-iteration 256^2 guided job's context, appended into the old default cache
   (1024 slots, doubling when full) vs a cache sized from the job's budget (model/generation/budget.py):
   reallocations and bytes copied (counted, not timed).

Usage: .venv/bin/python bench/gpu_path_cpu.py [--json bench/results/gpu_path_cpu.json] [--reps N]
"""

from __future__ import annotations

import argparse
import math
import time

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
from PIL import Image

import strokes.model.network.static_decode as static_decode
from strokes.model.generation.budget import job_budget
from strokes.model.generation.loading import load_engine
from strokes.model.network.attention import causal_mask
from strokes.model.network.decoder import rope_tables, route
from strokes.model.network.kv_cache import branch_rooms
from strokes.model.network.static_decode import StaticDecoder
from strokes.model.spec.params import GenerationParams
from strokes.model.spec.prompts import GEN_THINK_SYSTEM_PROMPT


def old_forward_block(lm, x, contexts, gen):
    """forward_block as it was: per layer and branch, torch.cat(cached keys, block keys)."""
    t = x.shape[1]
    ropes = torch.tensor([ctx.rope for ctx in contexts])
    positions = ropes[:, None] + torch.zeros(t, dtype=torch.long)[None, :]
    cos, sin = rope_tables(positions, lm.cfg.head_dim, lm.cfg.rope_theta, x.dtype)
    for index, layer in enumerate(lm.model.layers):

        def attend(q, k, v, index=index):
            outs = []
            for row, ctx in enumerate(contexts):
                n = ctx.length
                keys = torch.cat([ctx.cache.keys(index, n), k[row]], dim=1)
                values = torch.cat([ctx.cache.values(index, n), v[row]], dim=1)
                outs.append(
                    torch.nn.functional.scaled_dot_product_attention(
                        q[row : row + 1], keys[None], values[None], enable_gqa=True
                    )
                )
            return torch.cat(outs, dim=0)

        x = layer(x, cos, sin, gen, attend)
    return route(x, gen, lm.model.norm, lm.model.norm_moe_gen)


def lockstep(pairs: dict, reps: int) -> dict:
    times = {name: [] for name in pairs}
    for r in range(reps):
        order = list(pairs) if r % 2 == 0 else list(pairs)[::-1]
        for name in order:
            t0 = time.perf_counter()
            pairs[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: round(1e3 * median(ts), 3) for name, ts in times.items()}


def edit_contexts(engine, size=256):
    cond, img_uncond = engine.new_cache(4096), engine.new_cache(4096)
    for c in (cond, img_uncond):
        engine.append_text(c, GEN_THINK_SYSTEM_PROMPT)
    image = Image.new("RGB", (size, size), (120, 160, 200))
    engine.append_vae_image(cond, image, generator=torch.Generator().manual_seed(0))
    engine.append_vit_image(cond, image)
    text_uncond = cond.snapshot()
    for c in (cond, img_uncond):
        engine.append_text(c, "Make the sky stormy and add a red kite flying above the house.")
    return cond, text_uncond, img_uncond


def bench_denoise(engine, reps):
    cond, text_uncond, img_uncond = edit_contexts(engine)
    lm, n = engine.model.language_model, (256 // 16) ** 2
    x = torch.randn(n, engine.cfg.patch_latent_dim, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(n)
    gen = slice(1, n + 1)
    contexts = [cond, text_uncond, img_uncond]
    rooms = branch_rooms(contexts, n + 2)
    with torch.inference_mode():
        block = engine.image_block(engine.model.embed_latents(x, 0.5, pos)).expand(3, -1, -1)
        old = old_forward_block(lm, block, contexts, gen)
        new = lm.forward_block(block, rooms, gen=gen)
        assert torch.allclose(old, new, atol=1e-5), "old and new denoising forwards differ"
        ms = lockstep(
            {
                "old_cat_ms": lambda: old_forward_block(lm, block, contexts, gen),
                "new_rooms_ms": lambda: lm.forward_block(block, rooms, gen=gen),
            },
            reps,
        )
    ms["context_tokens"] = {
        "cond": cond.length,
        "text_uncond": text_uncond.length,
        "img_uncond": img_uncond.length,
    }
    ms["ratio_old_over_new"] = round(ms["old_cat_ms"] / ms["new_rooms_ms"], 3)
    return ms


def bench_decode(engine, reps, context=700, capacity=4096):
    cache = engine.new_cache(capacity)
    ids = torch.randint(0, 700, (context,), generator=torch.Generator().manual_seed(2)).tolist()
    engine.append_ids(cache, ids)
    decoder = StaticDecoder(engine.model, use_graph=False)
    decoder.begin(cache, capacity - context)  # an arena of `capacity` slots (a power of two)
    real = static_decode.length_bucket

    def step(whole: bool):  # StaticDecoder.step runs in inference mode
        static_decode.length_bucket = (lambda needed, cap: cap) if whole else real
        try:
            decoder.step(5)
        finally:
            static_decode.length_bucket = real
        decoder.length = decoder.rope = context  # the same step again: the same live length

    ms = lockstep({"old_capacity_ms": lambda: step(True), "new_bucket_ms": lambda: step(False)}, reps)
    ms.update(context=context, capacity=decoder.capacity, bucket=real(context + 1, decoder.capacity))
    ms["ratio_old_over_new"] = round(ms["old_capacity_ms"] / ms["new_bucket_ms"], 3)
    return ms


def bench_prefill_attention(engine, reps, cached=2048, tq=64):
    cfg = engine.cfg.llm
    h, g, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, h, tq, d, generator=gen)
    k, v = (torch.randn(1, g, cached + tq, d, generator=gen) for _ in range(2))
    F = torch.nn.functional

    def old():
        for _ in range(cfg.num_layers):
            mask = causal_mask(tq, cached + tq, q.device)
            kk, vv = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)
            F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

    def new():
        for _ in range(cfg.num_layers):
            mask = causal_mask(tq, cached + tq, q.device)
            qg = q.reshape(1, g, (h // g) * tq, d)
            F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(h // g, 1)).view(1, h, tq, d)

    ms = lockstep({"old_repeat_ms": old, "new_grouped_ms": new}, reps)
    ms.update(cached=cached, block=tq, layers=cfg.num_layers)
    ms["ratio_old_over_new"] = round(ms["old_repeat_ms"] / ms["new_grouped_ms"], 3)
    return ms


def cache_growth(engine):
    """Reallocations of the old default cache over a 3-iteration 256^2 job's context."""
    params = GenerationParams(prompt="a red kite over a house", width=256, height=256, max_iterations=3)
    budget = job_budget(engine.cfg, engine.tokenizer.segment, params)
    capacity, grows, copied_tokens = 1024, 0, 0
    while capacity < budget.cond:
        copied_tokens += capacity  # the doubling copies what was there (up to the old capacity)
        capacity, grows = 2 * capacity, grows + 1
    cfg = engine.cfg.llm
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # K and V, float32
    return {
        "job_budget_tokens": budget.cond,
        "old_reallocations": grows,
        "old_copied_mb": round(copied_tokens * per_token / 2**20, 1),
        "new_reallocations": 0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    setup_threads(1)
    engine = load_engine(small_checkpoint(), device="cpu", dtype=torch.float32)
    quiet = wait_for_quiet()
    busy = Interference().start()
    result = {
        "benchmark": "gpu_path_cpu",
        "sizes": small_sizes(),
        "machine": machine(),
        "quiet": quiet,
        "reps": args.reps,
    }
    log("denoising step (3 branches, 256^2 edit context) ...")
    result["denoise_step"] = bench_denoise(engine, args.reps)
    log("static decode step ...")
    result["decode_step"] = bench_decode(engine, 4 * args.reps)
    log("prefill attention ...")
    result["prefill_attention"] = bench_prefill_attention(engine, args.reps)
    result["cache_growth"] = cache_growth(engine)
    result["other_processes_busy_share"] = busy.stop()
    rows = [
        ("denoise step, 3 branches", "denoise_step", "old_cat_ms", "new_rooms_ms"),
        ("static decode step, 700 of 4096", "decode_step", "old_capacity_ms", "new_bucket_ms"),
        ("prefill attention, 64 after 2048", "prefill_attention", "old_repeat_ms", "new_grouped_ms"),
    ]
    print(f"{'what':<34} {'old ms':>9} {'new ms':>9} {'old/new':>8}")
    for label, key, old, new in rows:
        r = result[key]
        print(f"{label:<34} {r[old]:>9.3f} {r[new]:>9.3f} {r['ratio_old_over_new']:>8.3f}")
    g = result["cache_growth"]
    print(
        f"cache growth over a 3-iteration 256^2 job ({g['job_budget_tokens']} tokens): "
        f"old {g['old_reallocations']} reallocations ({g['old_copied_mb']} MB copied), new 0"
    )
    print(f"others busy: {result['other_processes_busy_share']:.0%} of the cores; torch threads 1")
    write_json(args.json, result)
    return 0 if math.isfinite(result["denoise_step"]["ratio_old_over_new"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
