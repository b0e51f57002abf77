"""GPU benchmark of the REAL BAGEL-7B-MoT shape with random bf16 weights, on one CUDA device.

Nothing is downloaded: the model is built from the real sizes (Qwen2 LLM hidden 3584, 28 layers,
28 heads, 4 KV heads, intermediate 18944, vocab 152064, two experts per layer; SigLIP so400m 1152 /
4304 / 26 layers / 16 heads; the FLUX VAE with its default sizes; BAGEL's image transforms) on the
meta device, cast to bf16 there, materialised on the GPU with `to_empty` (no CPU copy of the
29 GB) and filled with small random values on the GPU. The VAE runs in float32, as load_engine
does. The tokenizer is the project's small tokenizer (ids are only indices into the real 152064-row
embedding; decoded tokens are restricted to its plain ids so the text streaming works).

Measured (progress on stderr, one JSON object on stdout and in --out):
- build: seconds to materialise and fill the weights, parameter count, weight GB;
- contexts: for 512^2 and 1024^2, the edit-style context the pipeline's refine stage reads
  (think system prompt, the image as clean VAE latents + ViT tokens, the prompt; text_uncond a
  prefix of cond; img_uncond system + prompt), with the seconds of each append;
- prefill: tokens/s of a 2048-token text block into an empty cache;
- denoising ms per step at 512^2 and 1024^2 with three guidance branches (cfg_text 4, cfg_img 2,
  interval [0, 1]), batched in one forward and sequential, plus two branches batched (text-to-image
  guidance); the first step of each run is a warm-up and is not counted; CUDA is synchronised
  after every step; the VAE decode of the final latent is timed apart;
- text decode ms/token at batch 1 (greedy, Engine.decode_text) after a short and after a long
  (1024^2 edit) context;
- a decode overhead probe: the same decode with a model of the same depth (28 layers) but hidden
  size 64, i.e. the host-side cost (Python, dispatch, kernel launches) that bounds batch-1 decode;
- peak GPU memory, overall and per phase;
- estimates derived from the above for DESIGN.md section 5 (1024^2 50-step 3-branch image,
  512^2 20-step text-to-image).
A time budget (--budget-s, default 420 s) skips the remaining measurements, marked "skipped",
so the run finishes within 8 minutes on one H100.

Usage:
  python bench/gpu_bagel7b.py [--out bench/results/gpu_bagel7b.json] [--device cuda:0]
  python bench/gpu_bagel7b.py --dry-run     # a tiny config on the CPU, in seconds (for tests);
                                            # writes bench/results/gpu_bagel7b.dry-run.json
Exit status 2 (with a message) when no CUDA device exists and --dry-run is not given.
Needs only torch and this repository's `model` package.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from strokes.model.generation.engine import Engine  # noqa: E402
from strokes.model.generation.loading import build_model  # noqa: E402
from strokes.model.network.bagel import Bagel  # noqa: E402
from strokes.model.network.config import BagelConfig, LLMConfig, ViTConfig  # noqa: E402
from strokes.model.network.tokenizer import BagelTokenizer  # noqa: E402
from strokes.model.spec.params import ImageSettings  # noqa: E402
from strokes.model.spec.prompts import GEN_THINK_SYSTEM_PROMPT  # noqa: E402
from strokes.model.testing.tiny import PRESETS, tiny_config  # noqa: E402
from strokes.model.testing.tiny_tokenizer import write_tiny_tokenizer  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "gpu_bagel7b.json"
DRY_OUT = REPO / "bench" / "results" / "gpu_bagel7b.dry-run.json"
PROMPT = "Make the sky stormy and add a red kite flying above the house."
THREE_BRANCHES = ImageSettings(
    steps=2, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel"
)
TWO_BRANCHES = ImageSettings(steps=2, cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.0, 1.0))
STARTED = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {msg}", file=sys.stderr, flush=True)


def bagel7b_config() -> BagelConfig:
    """BAGEL-7B-MoT as the official loader builds it (llm_config.json / vit_config.json of the
    release, ViT 27 -> 26 layers); the VAE and image transforms are the defaults (the real ones)."""
    return BagelConfig(
        llm=LLMConfig(
            hidden_size=3584,
            intermediate_size=18944,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            vocab_size=152064,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            max_position_embeddings=32768,
        ),
        vit=ViTConfig(hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16),
    )


@torch.no_grad()
def randomize_(module: torch.nn.Module, generator: torch.Generator, vae: bool = False) -> None:
    """Small random values in place, on the module's device (as model/testing/tiny.py does on the CPU)."""
    for name, p in module.named_parameters():
        if vae:
            std = 0.02 if p.ndim == 1 else p[0].numel() ** -0.5
            p.normal_(0.0, std, generator=generator)
        elif p.ndim == 1 and "norm" in name:
            p.normal_(1.0, 0.1, generator=generator)
        else:
            p.normal_(0.0, 0.02 if p.ndim > 1 else 0.01, generator=generator)


def materialise(cfg: BagelConfig, device: torch.device, dtype: torch.dtype) -> tuple[Bagel, torch.nn.Module]:
    model, vae = build_model(cfg)  # meta
    model = model.to(dtype).to_empty(device=device)  # the cast is free on meta: bf16 storage only
    vae = vae.to_empty(device=device)  # float32, as load_engine loads it
    gen = torch.Generator(device=device).manual_seed(0)
    randomize_(model, gen)
    model.init_position_tables()
    randomize_(vae, gen, vae=True)
    return model.eval(), vae.eval()


def synthetic_image(size: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.3 + 0.5 * y, 0.5 + 0.3 * x * y, 0.9 - 0.4 * y], axis=-1)
    img[int(0.7 * size) :] = [0.25, 0.55, 0.2]
    img[int(0.45 * size) : int(0.7 * size), int(0.3 * size) : int(0.6 * size)] = [0.8, 0.7, 0.5]
    return Image.fromarray((img * 255).astype(np.uint8))


class Bench:
    def __init__(self, engine: Engine, device: torch.device, budget_s: float):
        self.engine, self.device, self.budget_s = engine, device, budget_s
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if self.cuda else None

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - STARTED)

    def timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0

    # ---- measurements ---------------------------------------------------------------------------
    def contexts(self, size: int) -> tuple[tuple, dict]:
        e = self.engine
        self.reset_peak()
        cond, img_uncond = e.new_cache(), e.new_cache()
        times = {}
        _, times["system_s"] = self.timed(
            lambda: (
                e.append_text(cond, GEN_THINK_SYSTEM_PROMPT),
                e.append_text(img_uncond, GEN_THINK_SYSTEM_PROMPT),
            )
        )
        image = e.prepare_image(synthetic_image(size))
        vae, times["vae_append_s"] = self.timed(
            lambda: e.append_vae_image(cond, image, generator=torch.Generator().manual_seed(0))
        )
        vit, times["vit_append_s"] = self.timed(lambda: e.append_vit_image(cond, image))
        text_uncond = cond.snapshot()
        _, times["prompt_s"] = self.timed(
            lambda: (e.append_text(cond, PROMPT), e.append_text(img_uncond, PROMPT))
        )
        info = {
            "image": f"{image.width}x{image.height}",
            "cond_tokens": cond.length,
            "text_uncond_tokens": text_uncond.length,
            "img_uncond_tokens": img_uncond.length,
            "vae_tokens": vae.tokens,
            "vit_tokens": vit.tokens,
            **{k: round(v, 4) for k, v in times.items()},
            "peak_gb": self.peak_gb(),
        }
        return (cond, text_uncond, img_uncond), info

    def prefill(self, tokens: int, repeats: int = 3) -> dict:
        e = self.engine
        ids = torch.randint(
            0, len(e.tokenizer) - 5, (tokens,), generator=torch.Generator().manual_seed(0)
        ).tolist()
        self.reset_peak()
        best = math.inf
        for _ in range(repeats):
            cache = e.new_cache(capacity=tokens)
            _, dt = self.timed(lambda cache=cache: e.append_ids(cache, ids))
            best = min(best, dt)
            del cache
        return {
            "tokens": tokens,
            "best_s": round(best, 4),
            "tokens_per_s": round(tokens / best, 1),
            "peak_gb": self.peak_gb(),
        }

    def denoise(self, contexts, size: int, settings: ImageSettings, batched: bool, steps: int) -> dict:
        """`steps` Euler steps after one warm-up step; ms per step (CUDA-synchronised per step)."""
        e = self.engine
        e.batch_branches = batched
        self.reset_peak()
        s = replace(settings, steps=steps + 2)  # steps + 1 Euler steps: the first is a warm-up
        n = (size // e.cfg.latent_downsample) ** 2
        noise = torch.randn(n, e.cfg.patch_latent_dim, generator=torch.Generator().manual_seed(1))
        gen = e.generate_image(*contexts, height=size, width=size, settings=s, noise=noise)
        it = iter(gen)
        per_step = []
        for i in range(steps + 1):
            _, dt = self.timed(lambda: next(it))
            if i:
                per_step.append(dt)
        _, decode_s = self.timed(lambda: next(it, None))  # the generator's epilogue: VAE decode
        assert gen.pixels is not None
        branches = gen.forwards // (steps + 1)
        return {
            "size": size,
            "branches": branches,
            "mode": "batched" if batched else "sequential",
            "steps_timed": len(per_step),
            "ms_per_step_mean": round(1e3 * statistics.fmean(per_step), 2),
            "ms_per_step_median": round(1e3 * statistics.median(per_step), 2),
            "ms_per_step_min": round(1e3 * min(per_step), 2),
            "vae_decode_ms": round(1e3 * decode_s, 1),
            "finite": bool(np.isfinite(gen.latent.float().cpu().numpy()).all()),
            "peak_gb": self.peak_gb(),
        }

    def decode(self, cache, tokens: int, warmup: int = 8) -> dict:
        e = self.engine
        plain = len(e.tokenizer) - 5  # the tokenizer's plain BPE ids: decodable, never a stop token
        mask = torch.full((e.cfg.llm.vocab_size,), float("-inf"), device=self.device, dtype=e.dtype)
        mask[:plain] = 0

        def processor(ids, logits):
            return logits + mask

        self.reset_peak()
        start = cache.length
        dec = e.decode_text(cache, max_tokens=tokens + warmup, logits_processor=processor, commit=False)
        times, t0 = [], time.perf_counter()
        for step in dec:  # sample_token's int() synchronises every token
            now = time.perf_counter()
            if step.token >= 0:
                times.append(now - t0)
            t0 = time.perf_counter()
        times = times[warmup:]
        return {
            "context_tokens": start,
            "tokens_timed": len(times),
            "ms_per_token_mean": round(1e3 * statistics.fmean(times), 3),
            "ms_per_token_median": round(1e3 * statistics.median(times), 3),
            "tokens_per_s": round(len(times) / sum(times), 1),
            "peak_gb": self.peak_gb(),
        }


def overhead_probe(layers: int, device, dtype, tokenizer, budget_s: float, tokens: int) -> dict:
    """Decode with a model of the same depth but hidden size 64: its ms/token is almost only the
    host-side cost of issuing the step's ops (Python + dispatch + kernel launches), the floor that
    eager execution puts under batch-1 decoding whatever the GPU's memory bandwidth."""
    cfg = tiny_config(replace(PRESETS["tiny"], layers=layers))
    model, vae = materialise(cfg, device, dtype)
    bench = Bench(Engine(model, vae, tokenizer), device, budget_s)
    cache = bench.engine.new_cache()
    bench.engine.append_text(cache, GEN_THINK_SYSTEM_PROMPT)
    out = bench.decode(cache, tokens)
    out["layers"], out["hidden"] = layers, cfg.llm.hidden_size
    return out


def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": p.name,
            "gpu_memory_gb": round(p.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "capability": f"{p.major}.{p.minor}",
        }
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def run(args) -> dict:
    dry = args.dry_run
    if dry:
        torch.set_num_threads(2)
        device = torch.device("cpu")
        cfg = tiny_config(PRESETS["tiny"])
        sizes, steps = (64, 128), {64: 3, 128: 2}
        decode_tokens, prefill_tokens = 16, 128
    else:
        device = torch.device(args.device)
        cfg = bagel7b_config()
        sizes, steps = (512, 1024), {512: args.steps_512, 1024: args.steps_1024}
        decode_tokens, prefill_tokens = args.decode_tokens, 2048
    dtype = torch.bfloat16
    result: dict = {
        "benchmark": "gpu_bagel7b",
        "dry_run": dry,
        "config": "tiny (dry run)" if dry else "BAGEL-7B-MoT shape, random weights",
        "llm": asdict(cfg.llm),
        "vit": asdict(cfg.vit),
        "vae": asdict(cfg.vae),
        "dtype": str(dtype),
        "vae_dtype": "torch.float32",
        "attn_impl": "sdpa",
        "machine": device_info(device),
        "skipped": [],
    }

    log(
        f"building {'the tiny' if dry else 'the BAGEL-7B-MoT-shaped'} model on {device} (meta -> to_empty) ..."
    )
    t0 = time.perf_counter()
    model, vae = materialise(cfg, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n_params = sum(p.numel() for p in model.parameters())
    result["build"] = {
        "seconds": round(time.perf_counter() - t0, 2),
        "params": n_params,
        "weights_gb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2),
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "memory_after_build_gb": round(torch.cuda.memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    }
    log(f"built: {n_params / 1e6:.1f} M parameters, {result['build']['weights_gb']} GB")
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp), vocab_size=384)
        tokenizer = BagelTokenizer.from_folder(tmp)
    engine = Engine(model, vae, tokenizer)
    bench = Bench(engine, device, args.budget_s)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def phase(name: str, need_s: float, fn):
        if bench.left() < need_s:
            log(f"skipping {name}: {bench.left():.0f} s of budget left, needs ~{need_s:.0f} s")
            result["skipped"].append(name)
            return None
        log(f"{name} ...")
        out = fn()
        log(f"{name}: {json.dumps(out[1] if isinstance(out, tuple) else out)}")
        return out

    result["prefill"] = phase("prefill", 10, lambda: bench.prefill(prefill_tokens))
    short = engine.new_cache()
    engine.append_text(short, GEN_THINK_SYSTEM_PROMPT)
    engine.append_text(short, PROMPT)
    result["decode_short_context"] = phase(
        "decode after a short context", 15, lambda: bench.decode(short, decode_tokens)
    )
    short = None  # free it

    result["denoise"] = []
    result["contexts"] = {}
    long_context = None
    for size in sizes:
        ctx = phase(f"context {size}^2", 20, lambda size=size: bench.contexts(size))
        if ctx is None:
            continue
        contexts, info = ctx
        result["contexts"][str(size)] = info
        runs = (
            (THREE_BRANCHES, True),
            (THREE_BRANCHES, False),
            (TWO_BRANCHES, True),
        )
        for settings, batched in runs:
            need = 10 if size <= 512 else 30
            label = f"denoise {size}^2, {'3' if settings is THREE_BRANCHES else '2'} branches, " + (
                "batched" if batched else "sequential"
            )
            r = phase(
                label,
                need,
                lambda s=settings, b=batched, c=contexts, z=size: bench.denoise(c, z, s, b, steps[z]),
            )
            if r is not None:
                result["denoise"].append(r)
        if size == sizes[-1]:
            long_context = contexts[0]
        ctx = contexts = None  # free the smaller contexts before the next size
    engine.batch_branches = True
    if long_context is not None:
        result["decode_long_context"] = phase(
            f"decode after the {sizes[-1]}^2 edit context",
            15,
            lambda: bench.decode(long_context, decode_tokens // 2),
        )
    result["decode_overhead_probe"] = phase(
        "decode overhead probe (same depth, hidden 64)",
        15,
        lambda: overhead_probe(cfg.llm.num_layers, device, dtype, tokenizer, args.budget_s, decode_tokens),
    )
    result["peak_gb"] = (
        round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    )
    result["estimates"] = estimates(result, sizes)
    result["total_seconds"] = round(time.perf_counter() - STARTED, 1)
    return result


def estimates(result: dict, sizes) -> dict:
    """Derived figures for DESIGN.md section 5 (compute only; no service or pipeline overhead)."""
    d = {(r["size"], r["branches"], r["mode"]): r for r in result.get("denoise", [])}
    small, large = sizes
    out = {}
    for (size, branches, mode), r in d.items():
        if mode == "sequential" and (size, branches, "batched") in d:
            out[f"sequential_over_batched_{size}"] = round(
                r["ms_per_step_mean"] / d[(size, branches, "batched")]["ms_per_step_mean"], 3
            )
    b3 = d.get((large, 3, "batched"))
    b2 = d.get((large, 2, "batched"))
    if b3:
        out[f"image_{large}_50steps_3branch_s"] = round(
            (49 * b3["ms_per_step_mean"] + b3["vae_decode_ms"]) / 1e3, 2
        )
    s2 = d.get((small, 2, "batched"))
    if s2:
        out[f"t2i_{small}_20steps_2branch_s"] = round(
            (19 * s2["ms_per_step_mean"] + s2["vae_decode_ms"]) / 1e3, 2
        )
    if b3 and b2 and result.get("decode_long_context"):
        # one plan/draft/reflect/refine iteration at 1024^2, 50 steps each: a 2-branch draft, a
        # 3-branch refine, ~300 decoded tokens, the draft appended (VAE + ViT prefill)
        ctx = result["contexts"].get(str(large), {})
        out[f"iteration_{large}_50steps_s"] = round(
            (
                49 * b2["ms_per_step_mean"]
                + b2["vae_decode_ms"]
                + 49 * b3["ms_per_step_mean"]
                + b3["vae_decode_ms"]
            )
            / 1e3
            + 300 * result["decode_long_context"]["ms_per_token_mean"] / 1e3
            + ctx.get("vae_append_s", 0)
            + ctx.get("vit_append_s", 0),
            2,
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny config on the CPU, in seconds")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument(
        "--out",
        default=None,
        help=f"JSON path (default {DEFAULT_OUT.relative_to(REPO)}; dry run: {DRY_OUT.relative_to(REPO)})",
    )
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip measurements past this many seconds")
    ap.add_argument("--steps-512", type=int, default=10, help="timed denoising steps per run at 512^2")
    ap.add_argument("--steps-1024", type=int, default=6, help="timed denoising steps per run at 1024^2")
    ap.add_argument("--decode-tokens", type=int, default=128)
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_bagel7b: no CUDA device is available (torch "
            f"{torch.__version__}); run it on a GPU machine, or use --dry-run for the tiny CPU check",
            file=sys.stderr,
        )
        return 2
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    out = Path(args.out) if args.out else (DRY_OUT if args.dry_run else DEFAULT_OUT)
    if str(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
