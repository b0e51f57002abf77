"""FP8 weights' distance from float32 on the golden cases, next to bfloat16's (CPU, FP8 emulated).

For every golden case (tests/fixtures/golden), the largest max and mean absolute difference per
quantity from the official float32 values, once in bfloat16 and once with the decoder layers' linear
layers in FP8 (model/network/fp8.py, emulated: row-wise e4m3 quantize/dequantize, float32 matmul,
over the bfloat16 model). conformance.FP8_TOLERANCE is twice the FP8 column's worst, the rule
BF16_TOLERANCE follows. "diverged": the decoded text took the other side of a near tie, so the
quantities after it are reported, not judged. On the GPU the device check runs the real kernel
against the same bounds (tests/model/generation/test_gpu.py).

Usage: python bench/fp8_golden.py [--json bench/results/fp8_golden.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import log, machine, setup_threads, write_json

from strokes.model.generation.loading import load_engine
from strokes.model.network.fp8 import quantize_decoder
from strokes.model.testing.conformance import run_case

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "golden"
CATEGORIES = ("logits", "flow", "latent", "image", "kv")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    setup_threads(1)
    result = {"benchmark": "fp8_golden", "machine": machine(), "cases": {}}
    for weights in ("bf16", "fp8"):
        engine = load_engine(GOLDEN / "tiny_ckpt", device="cpu", dtype="bfloat16")
        if weights == "fp8":
            quantize_decoder(engine.model.language_model, emulate=True)
            engine.weights = "fp8"
        for path in sorted((GOLDEN / "cases").glob("*.json")):
            log(f"{weights} {path.stem} ...")
            d = run_case(engine, path)
            result["cases"].setdefault(path.stem, {})[weights] = {
                "max": {k: round(v, 4) for k, v in d.worst.items() if k in CATEGORIES},
                "mean": {k: round(v, 4) for k, v in d.worst_mean.items() if k in CATEGORIES},
                "diverged": d.diverged,
                "failures": d.failures,
            }
    print(f"{'case':<18} {'quantity':<8} {'bf16 max / mean':>18} {'fp8 max / mean':>18}")
    for case, both in result["cases"].items():
        for q in CATEGORIES:
            if q not in both["bf16"]["max"]:
                continue
            cells = [f"{both[w]['max'][q]:.3f} / {both[w]['mean'][q]:.4f}" for w in ("bf16", "fp8")]
            print(f"{case:<18} {q:<8} {cells[0]:>18} {cells[1]:>18}")
        if both["fp8"]["diverged"]:
            print(
                f"{case:<18} fp8 decoded text diverged at a near tie: later quantities reported, not judged"
            )
    ok = all(not both[w]["failures"] for both in result["cases"].values() for w in both)
    print("every case within its bounds (bf16: BF16_TOLERANCE, fp8: FP8_TOLERANCE):", ok)
    write_json(args.json, result)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
