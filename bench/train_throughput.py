"""Training throughput on the CPU: tokens/s and peak memory of `strokes train`, tiny and small, full and LoRA.

Each configuration runs in a process of its own (peak memory is that process's peak RSS), through
the real loop (model/training/trainer.py: packing, the official forward, the reduction, backward,
clipping, AdamW; fp32, no activation checkpointing, no DataLoader workers) on the synthetic
trajectories of model/testing/tiny_data.py, one sample per pack:
- tiny: the golden tiny checkpoint (LLM hidden 64, 2 layers), 64x64 images (a pack is ~200-300 tokens);
- small: the shared "small" configuration of DESIGN.md section 5 (hidden 512, 8 layers), whose VAE
  transform makes the images 256x256 (a pack is ~1,000-2,000 tokens).
`warmup` steps are run first and not counted; tokens/s is the sum of the packed tokens of the
measured steps over their wall time. LoRA is rank 16 on every projection of both experts.

Usage: python bench/train_throughput.py [--json bench/results/train_throughput.json] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (
    REPO,
    Interference,
    log,
    machine,
    setup_threads,
    small_checkpoint,
    wait_for_quiet,
    write_json,
)

TINY = REPO / "tests" / "fixtures" / "golden" / "tiny_ckpt"
CONFIGS = [("tiny", "full"), ("tiny", "lora"), ("small", "full"), ("small", "lora")]


def one(size: str, mode: str, steps: int, warmup: int, out: Path) -> dict:
    """Run one configuration in this process and return its figures."""
    setup_threads()
    from strokes.model.testing.tiny_data import write_samples
    from strokes.model.training.config import TrainConfig
    from strokes.model.training.trainer import train

    work = Path(tempfile.mkdtemp(prefix=f"train-{size}-{mode}-"))
    data = write_samples(work, think=True)
    checkpoint = TINY if size == "tiny" else small_checkpoint()
    cfg = TrainConfig(
        data=str(data),
        checkpoint=str(checkpoint),
        out=str(work / "run"),
        mode=mode,
        steps=warmup + steps,
        lr=1e-4,
        warmup_steps=0,
        max_tokens=4000 if size == "small" else 400,
        text_dropout=0.0,
        vit_dropout=0.0,
        vae_dropout=0.0,
        precision="fp32",
        activation_checkpointing=False,
        save_every=10_000,
        log_every=1,
        num_workers=0,
        device="cpu",
        export="none",
    )
    interference = Interference().start()
    result = train(cfg)
    busy = interference.stop()
    records = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()][warmup:]
    tokens = sum(r["tokens_per_s"] * r["step_seconds"] for r in records)
    seconds = sum(r["step_seconds"] for r in records)
    figures = {
        "size": size,
        "mode": mode,
        "steps_measured": len(records),
        "tokens_per_step": round(tokens / len(records), 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "step_seconds": round(seconds / len(records), 3),
        "peak_memory_gb": round(result.last["peak_memory_gb"], 3),
        "final_loss": round(result.last["loss"], 4),
        "other_processes_busy_share": busy,
    }
    out.write_text(json.dumps(figures))
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default: 20 tiny, 3 small)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--one", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one(*args.one, args.steps or 3, args.warmup, Path(args.out))
        return
    small_checkpoint()  # written once, outside the measurements
    quiet = wait_for_quiet()
    rows = []
    for size, mode in CONFIGS:
        log(f"== {size} {mode}")
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            steps = args.steps or (20 if size == "tiny" else 3)
            cmd = [
                sys.executable,
                __file__,
                "--one",
                size,
                mode,
                "--steps",
                str(steps),
                "--warmup",
                str(args.warmup),
                "--out",
                f.name,
            ]
            subprocess.run(cmd, check=True, cwd=REPO, stdout=sys.stderr)  # its progress lines: stderr
            rows.append(json.loads(Path(f.name).read_text()))
    print(
        f"{'config':<12} {'tokens/step':>11} {'tokens/s':>9} {'s/step':>7} {'peak GB':>8} {'others busy':>11}"
    )
    for r in rows:
        print(
            f"{r['size'] + ' ' + r['mode']:<12} {r['tokens_per_step']:>11.0f} {r['tokens_per_s']:>9.0f} "
            f"{r['step_seconds']:>7.2f} {r['peak_memory_gb']:>8.2f} {r['other_processes_busy_share']:>11.0%}"
        )
    write_json(args.json, {"machine": machine(), "quiet": quiet, "results": rows})


if __name__ == "__main__":
    main()
