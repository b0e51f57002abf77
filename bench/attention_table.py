"""Measure every SDPA backend on BAGEL's attention shapes and write the per-shape backend table.

On one CUDA device, bf16, BAGEL-7B's heads (28 query heads, 4 kv heads, head_dim 128), for each
shape kind of model/network/attention.py (`shape_kind`):
- image: a denoising block against its context: 512^2 (1026 tokens) and 1024^2 (4098 tokens)
  after a short prompt and after a refine's context (draft VAE + ViT tokens);
- square: a causal text block into an empty cache (128 and 2048 tokens);
- prefill: a causal block after a cache (64 after 1024, 200 after 9450);
- single: one query (the eager decode) over 1k and 8k keys.
Each backend (cudnn, flash, efficient, math; math only where its float32 scores fit) runs
through attention_sdpa's own call for that kind under `sdpa_kernel([backend])`; a backend that
refuses the shape or disagrees with math (max abs diff > 0.02) is "unsupported". Times: median of
CUDA-event-timed repetitions after a warm-up. Rules: per kind, one rule per measured shape (the
smallest shape that covers a call decides), then a catch-all from the largest shape; backends in
order of measured speed.

Writes the measurements to --out (default bench/results/attention_table.json); with --install also
replaces this GPU's entry in model/network/attention_table.json, which the model reads.

Usage: python3 bench/attention_table.py [--install] [--out PATH]   # on the device (gpu_check.sh)
       python3 bench/attention_table.py --dry-run                  # tiny shapes, CPU backends
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402

from strokes.model.network.attention import BACKENDS, KINDS, TABLE_PATH, parse_table, prefill_lower_right  # noqa: E402

H, G, D = 28, 4, 128
SHAPES = {  # kind -> (Tq, Tk)
    "image": [(1026, 1326), (1026, 6300), (4098, 4398), (4098, 13548)],
    "square": [(128, 128), (2048, 2048)],
    "prefill": [(64, 1088), (200, 9650)],
    "single": [(1, 1024), (1, 8192)],
}
DRY_SHAPES = {"image": [(18, 40)], "square": [(16, 16)], "prefill": [(4, 20)], "single": [(1, 32)]}
MATH_LIMIT = 2**31  # score elements (B*H*Tq*Tk) math may materialise


def call(kind: str, q, k, v):
    if kind == "prefill":
        return prefill_lower_right(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=kind == "square", enable_gqa=True)


def measure(kind: str, tq: int, tk: int, device: torch.device, reps: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    h, g, d = (H, G, D) if device.type == "cuda" else (8, 2, 16)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, h, tq, d, generator=gen, device=device, dtype=dtype)
    k, v = (torch.randn(1, g, tk, d, generator=gen, device=device, dtype=dtype) for _ in range(2))
    with sdpa_kernel([BACKENDS["math"]]):
        expected = call(kind, q, k, v).float() if h * tq * tk <= MATH_LIMIT else None
    result = {}
    for name, backend in BACKENDS.items():
        if name == "math" and expected is None:
            result[name] = {"unsupported": "too large for float32 scores"}
            continue
        try:
            with sdpa_kernel([backend]):
                out = call(kind, q, k, v)
                if expected is not None and (out.float() - expected).abs().max().item() > 0.02:
                    result[name] = {"unsupported": "disagrees with math"}
                    continue
                times = []
                for _ in range(reps + 2):
                    if device.type == "cuda":
                        start, end = (
                            torch.cuda.Event(enable_timing=True),
                            torch.cuda.Event(enable_timing=True),
                        )
                        start.record()
                        call(kind, q, k, v)
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end))
                    else:
                        t0 = time.perf_counter()
                        call(kind, q, k, v)
                        times.append(1e3 * (time.perf_counter() - t0))
            result[name] = {"ms": round(statistics.median(times[2:]), 4)}
        except RuntimeError as e:  # "No available kernel" and the like: this backend cannot run it
            result[name] = {"unsupported": str(e).splitlines()[0][:160]}
    return result


def rules(measured: dict) -> list[dict]:
    out = []
    for kind in KINDS:
        shapes = sorted(measured.get(kind, {}).items(), key=lambda kv: tuple(map(int, kv[0].split("x"))))
        for i, (shape, backends) in enumerate(shapes):
            ranked = sorted((b for b in backends if "ms" in backends[b]), key=lambda b: backends[b]["ms"])
            if not ranked:
                continue
            tq, tk = map(int, shape.split("x"))
            last = i == len(shapes) - 1
            out.append(
                {
                    "kind": kind,
                    "max_tq": 1 << 30 if last else tq,
                    "max_tk": 1 << 30 if last else tk,
                    "backends": ranked,
                }
            )
    return out


def install(gpu: str, dtype: str, table_rules: list[dict]) -> None:
    data = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.is_file() else {"tables": []}
    data["tables"] = [t for t in data["tables"] if (t["gpu"], t["dtype"]) != (gpu, dtype)]
    data["tables"].append({"gpu": gpu, "dtype": dtype, "rules": table_rules})
    parse_table(data, str(TABLE_PATH))  # what the model will read must parse
    TABLE_PATH.write_text(json.dumps(data, indent=2) + "\n")
    print(f"installed {len(table_rules)} rules for {gpu} ({dtype}) into {TABLE_PATH}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (for tests)")
    ap.add_argument("--install", action="store_true", help="write this GPU's rules into the model's table")
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "attention_table: no CUDA device is available; use --dry-run for the CPU check", file=sys.stderr
        )
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda:0")
    if args.dry_run:
        torch.set_num_threads(1)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    started = time.perf_counter()
    measured: dict = {}
    for kind, shapes in (DRY_SHAPES if args.dry_run else SHAPES).items():
        for tq, tk in shapes:
            measured.setdefault(kind, {})[f"{tq}x{tk}"] = measure(
                kind, tq, tk, device, 2 if args.dry_run else args.reps
            )
            best = min(
                ((b, r["ms"]) for b, r in measured[kind][f"{tq}x{tk}"].items() if "ms" in r),
                key=lambda x: x[1],
                default=("none", 0),
            )
            print(f"{kind:<8} {tq:>5}x{tk:<6} best {best[0]} {best[1]} ms", file=sys.stderr, flush=True)
    result = {
        "benchmark": "attention_table",
        "dry_run": args.dry_run,
        "gpu": gpu,
        "torch": torch.__version__,
        "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "heads": {"query": H, "kv": G, "head_dim": D}
        if device.type == "cuda"
        else {"query": 8, "kv": 2, "head_dim": 16},
        "measured_ms": measured,
        "rules": rules(measured),
        "seconds": round(time.perf_counter() - started, 1),
    }
    default = f"attention_table{'.dry-run' if args.dry_run else ''}.json"
    out = Path(args.out or REPO / "bench" / "results" / default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    if args.install and not args.dry_run:
        install(gpu, result["dtype"], result["rules"])
    return 0 if result["rules"] else 1


if __name__ == "__main__":
    sys.exit(main())
