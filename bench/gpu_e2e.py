"""End-to-end GPU timings of the REAL BAGEL-7B-MoT shape (random bf16 weights), against DESIGN.md 5,
eager vs compiled vs FP8.

The model is built as bench/gpu_bagel7b.py builds it (meta -> bf16 -> materialised and filled on
the GPU; the VAE in float32; the project's small tokenizer, decoded tokens restricted to its plain
ids). Every figure is a whole operation timed with the GPU synchronised at its end, after one
warm-up of the same kind (cuDNN/cuBLAS autotuning, graph capture and lazy kernel loading are not
counted; each figure says what it includes):

- decode_1k / decode_8k: ms per token of greedy decoding (static decoder, CUDA graphs per length
  bucket) after 1024 and 8192 tokens of context, median over the tokens after the first 8;
  target <= 6 ms/token;
- t2i_512_20: a 512^2 text-to-image, 20 steps, BAGEL's default guidance (text CFG 4 on [0.4, 1]),
  VAE decode included; target <= 1.2 s;
- t2i_1024: the same at 1024^2 with the default 50 steps; target <= 8 s (floor ~7 s);
- iteration_1024: one whole guided iteration through the pipeline (plan 200 tokens, draft t2i,
  reflect 100 tokens, refine edit with three branches on every step, all at 1024^2, 50 steps
  each); target <= 25 s (floor ~21 s);
- peak GPU memory overall and per operation.

Every row runs in each mode (--modes, in this order, each after a short warm-up of every row
so compiling and graph capture are not timed; `compile_s` says what the warm-up took):
- eager: bf16, eager layers, the static decoder with the masked SDPA;
- compiled: bf16, layers compiled with inductor (model/network/compiled.py), flex decoding;
- fp8: the decoder layers' linear layers in FP8 (model/network/fp8.py), compiled as above; the
  model is quantized in place, so it comes last. Its distance from bf16: `fp8_vs_eager` compares
  the t2i_512_20 final latents of the same seed (relative L2), as `compiled_vs_eager` does.
`summary` lists each row's seconds (decode: ms/token) per mode next to its target.

Usage: python3 bench/gpu_e2e.py [--device cuda:0] [--out bench/results/gpu_e2e.json] [--budget-s 300]
                                [--modes eager,compiled,fp8]
       python3 bench/gpu_e2e.py --dry-run   # a tiny model on the CPU, in seconds (for tests; FP8
                                            # emulated, "compiled" traced without code generation)
Exit 2 without CUDA (and no --dry-run); 1 if a result is not finite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gpu_bagel7b import bagel7b_config, device_info, materialise  # noqa: E402

from strokes.model.generation.engine import Engine  # noqa: E402
from strokes.model.generation.pipeline import Pipeline  # noqa: E402
from strokes.model.network.compiled import CompileOptions  # noqa: E402
from strokes.model.network.fp8 import quantize_decoder  # noqa: E402
from strokes.model.network.tokenizer import BagelTokenizer  # noqa: E402
from strokes.model.spec.params import (  # noqa: E402
    DRAFT_DEFAULTS,
    REFINE_DEFAULTS,
    GenerationParams,
    RunOptions,
    TextSettings,
)
from strokes.model.testing.tiny import PRESETS, tiny_config  # noqa: E402
from strokes.model.testing.tiny_tokenizer import write_tiny_tokenizer  # noqa: E402

PROMPT = "A red kite flying above a small house under a stormy sky."
STARTED = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {msg}", file=sys.stderr, flush=True)


class Run:
    def __init__(self, engine: Engine, device: torch.device, budget_s: float, dry: bool):
        self.engine, self.device, self.budget_s, self.dry = engine, device, budget_s, dry
        self.cuda = device.type == "cuda"
        plain = len(engine.tokenizer) - 5  # the small tokenizer's plain ids: decodable, never a stop
        self.mask = torch.full((engine.cfg.llm.vocab_size,), float("-inf"), device=device, dtype=engine.dtype)
        self.mask[:plain] = 0
        self.latents: dict[int, torch.Tensor] = {}  # size -> the last t2i's final latent (N, P), on the host

    def processor(self, ids, logits):
        return logits + self.mask

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def peak(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if self.cuda else None

    def timed(self, fn) -> tuple[object, float, float | None]:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0, self.peak()

    # ---- operations ------------------------------------------------------------------------------
    def decode(self, context: int, tokens: int) -> dict:
        e = self.engine
        cache = e.new_cache(context + tokens + 16)
        ids = torch.randint(0, len(e.tokenizer) - 5, (context,), generator=torch.Generator().manual_seed(0))
        e.append_ids(cache, ids.tolist())
        dec = e.decode_text(cache, max_tokens=tokens, logits_processor=self.processor, commit=False)
        times, t0 = [], time.perf_counter()
        for step in dec:  # sample_token's int() synchronises every token
            now = time.perf_counter()
            if step.token >= 0:
                times.append(now - t0)
            t0 = time.perf_counter()
        steady = times[8:] or times
        return {
            "context_tokens": context,
            "tokens": len(times),
            "ms_per_token_median": round(1e3 * statistics.median(steady), 3),
            "ms_per_token_mean": round(1e3 * statistics.fmean(steady), 3),
            "first_tokens_ms": [round(1e3 * t, 1) for t in times[:3]],  # include graph captures
            "graph_captures": e._decoder.captures if e._decoder is not None else 0,
            "peak_gb": self.peak(),
        }

    def t2i(self, size: int, steps: int) -> dict:
        e = self.engine
        settings = replace(DRAFT_DEFAULTS, steps=steps)

        def run():
            cond = e.new_cache(256 + (size // 16) ** 2)
            e.append_text(cond, PROMPT)
            gen = e.generate_image(
                cond,
                e.new_cache(8).snapshot(),
                cond,
                height=size,
                width=size,
                settings=settings,
                generator=torch.Generator().manual_seed(1),
            )
            list(gen)
            return gen

        gen, seconds, peak = self.timed(run)
        self.latents[size] = gen.latent.float().cpu()
        return {
            "size": size,
            "steps": steps,
            "branch_forwards": gen.forwards,
            "seconds": round(seconds, 3),
            "finite": bool(np.isfinite(gen.latent.float().cpu().numpy()).all()),
            "peak_gb": peak,
        }

    def iteration(self, size: int, steps: int, plan: int, reflect: int) -> dict:
        params = GenerationParams(
            prompt=PROMPT,
            width=size,
            height=size,
            max_iterations=1,
            seed=0,
            draft=replace(DRAFT_DEFAULTS, steps=steps),
            refine=replace(REFINE_DEFAULTS, steps=steps),
            plan=TextSettings(max_tokens=plan),
            reflect=TextSettings(max_tokens=reflect),
        )
        events, seconds, peak = self.timed(
            lambda: list(
                Pipeline(self.engine).run(params, options=RunOptions(logits_processor=self.processor))
            )
        )
        done = events[-1]
        stages = {f"{ev.stage.value}": ev.seconds for ev in events if type(ev).__name__ == "StageCompleted"}
        return {
            "size": size,
            "steps": steps,
            "seconds": round(seconds, 3),
            "stage_seconds": stages,
            "usage": done.usage,
            "refined": "refine" in stages,
            "peak_gb": peak,
        }


def set_mode(engine: Engine, mode: str, cache_dir: str, dry: bool) -> None:
    """Put the engine in `mode` (eager, compiled, fp8); fp8 quantizes in place, so it comes last."""
    lm = engine.model.language_model
    if mode == "fp8" and engine.weights != "fp8":
        quantize_decoder(lm, emulate=dry)  # dry run: the CPU's emulation
        engine.weights = "fp8"
    options = CompileOptions(cache_dir=cache_dir, backend="aot_eager" if dry else "inductor")
    lm.compile_regions(None if mode == "eager" else options)
    engine.decode_kernel = None  # flex when compiled, the masked SDPA when eager
    engine._decoder = None  # a fresh decoder (and graphs) for the mode


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(((a - b).norm() / b.norm()).item(), 5)


def run(args) -> dict:
    dry = args.dry_run
    device = torch.device("cpu" if dry else args.device)
    cfg = tiny_config(PRESETS["tiny"]) if dry else bagel7b_config()
    modes = [m for m in args.modes.split(",") if m]
    known = all(m in ("eager", "compiled", "fp8") for m in modes)
    if not modes or not known or ("fp8" in modes and modes[-1] != "fp8"):
        raise SystemExit(f"gpu_e2e: --modes takes eager, compiled, fp8 (fp8 last), got {args.modes}")
    if dry:
        torch.set_num_threads(1)
        plan = {"decode": (64, 256, 16), "small": (64, 3), "large": (128, 3), "iteration": (64, 3, 12, 8)}
        warm = {"small": (64, 3), "iteration": (64, 3, 4, 4), "decode": 4}
    else:
        plan = {
            "decode": (1024, 8192, 128),
            "small": (512, 20),
            "large": (1024, 50),
            "iteration": (1024, 50, 200, 100),
        }
        # 12 steps: both the two-branch and (below t = 0.4) the one-branch image blocks occur
        warm = {"small": (512, 12), "iteration": (1024, 12, 16, 16), "decode": 8}
    targets = {"decode_1k": 6.0, "decode_8k": 6.0, "t2i_512_20": 1.2, "t2i_1024": 8.0, "iteration_1024": 25.0}
    result: dict = {
        "benchmark": "gpu_e2e",
        "dry_run": dry,
        "config": "tiny (dry run)" if dry else "BAGEL-7B-MoT shape, random bf16 weights",
        "machine": device_info(device),
        "modes": {},
        "skipped": [],
        "targets": targets,
    }
    log(f"building the model on {device} ...")
    t0 = time.perf_counter()
    model, vae = materialise(cfg, device, torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp), vocab_size=384)
        tokenizer = BagelTokenizer.from_folder(tmp)
    engine = Engine(model, vae, tokenizer)
    engine.static_decode = True  # on GPU the default; on the dry run its CPU form
    result["build_s"] = round(time.perf_counter() - t0, 1)
    r = Run(engine, device, args.budget_s, dry)
    short, long, tokens = plan["decode"]
    small, small_steps = plan["small"]
    large, large_steps = plan["large"]
    rows = {
        "decode_1k": (20, lambda: r.decode(short, tokens)),
        "decode_8k": (20, lambda: r.decode(long, tokens)),
        "t2i_512_20": (10, lambda: r.t2i(small, small_steps)),
        "t2i_1024": (30, lambda: r.t2i(large, large_steps)),
        "iteration_1024": (90, lambda: r.iteration(*plan["iteration"])),
    }
    latents: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for mode in modes:
            left = args.budget_s - (time.perf_counter() - STARTED)
            if left < 60:
                log(f"skipping mode {mode}: {left:.0f} s of budget left")
                result["skipped"].append(mode)
                continue
            out = result["modes"][mode] = {}
            log(f"== mode {mode}: warm-up (compiles, captures) ...")
            set_mode(engine, mode, cache_dir, dry)
            t0 = time.perf_counter()
            r.t2i(*warm["small"])
            r.iteration(*warm["iteration"])
            r.decode(short, warm["decode"])
            r.decode(long, warm["decode"])
            out["compile_s"] = round(time.perf_counter() - t0, 1)
            log(f"{mode} warm-up: {out['compile_s']} s")
            for name, (need_s, fn) in rows.items():
                left = args.budget_s - (time.perf_counter() - STARTED)
                if left < need_s:
                    log(f"skipping {mode} {name}: {left:.0f} s of budget left, needs ~{need_s} s")
                    result["skipped"].append(f"{mode}/{name}")
                    continue
                out[name] = fn()
                log(f"{mode} {name}: {json.dumps(out[name])}")
            if small in r.latents and "t2i_512_20" in out:
                latents[mode] = r.latents.pop(small)
    for mode in ("compiled", "fp8"):
        if mode in latents and "eager" in latents:
            result[f"{mode}_vs_eager"] = {
                "t2i_512_20_final_latent_relative_l2": relative_l2(latents[mode], latents["eager"])
            }
    result["summary"] = {
        name: {"target": target}
        | {
            mode: (m[name]["ms_per_token_median"] if name.startswith("decode") else m[name]["seconds"])
            for mode, m in result["modes"].items()
            if name in m
        }
        for name, target in targets.items()
    }
    result["peak_gb"] = (
        round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    )
    result["total_seconds"] = round(time.perf_counter() - STARTED, 1)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU, in seconds")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_e2e[.dry-run].json)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="skip operations past this many seconds")
    ap.add_argument("--modes", default="eager,compiled,fp8", help="comma-separated, in order; fp8 last")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_e2e: no CUDA device is available; use --dry-run for the tiny CPU check", file=sys.stderr)
        return 2
    if not args.dry_run:
        torch.cuda.set_device(torch.device(args.device))
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    out = Path(args.out or REPO / "bench" / "results" / f"gpu_e2e{'.dry-run' if args.dry_run else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    log(f"wrote {out}")
    finite = all(
        m[k]["finite"] for m in result["modes"].values() for k in ("t2i_512_20", "t2i_1024") if k in m
    )
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
