"""One LoRA training step of the REAL BAGEL-7B-MoT shape (random bf16 weights) on a 10k-token pack, on one GPU.

The model is built as bench/gpu_bagel7b.py builds it (meta -> bf16 -> materialised and filled on
the GPU; the VAE in float32), as `TrainingBagel` (the same parameters, the training forward), with
rank-16 adapters on every projection of both experts (float32) and the base frozen in bf16, i.e.
what `strokes train --mode lora` runs on one 80 GB GPU. The pack is two synthetic process
trajectories at 512x512 (model/testing/tiny_data.py: a multi-turn one and an
instruction-intermediate conflict one: plan, draft, reflection with <refine>, refinement,
reflection), packed by the official rules: about 10,300 tokens (each drawn image noisy, then clean
latents and ViT tokens for the text after it). A step is exactly the trainer's: bf16 autocast,
activation checkpointing, the official reduction, backward, clipping, AdamW. One warm-up step is
not counted; then `--steps` steps, each timed with the GPU synchronised.

Measured: seconds per step (median), tokens/s, peak GPU memory, the LoRA parameter count, the
loss (finite). DESIGN.md section 5 target: under 1.5 s per step (floor about 0.7 s).

Usage: python3 bench/gpu_train.py [--device cuda:0] [--out bench/results/gpu_train.json] [--steps 3]
       python3 bench/gpu_train.py --dry-run    # the same code on the tiny shape on the CPU, in seconds
Exit 2 without CUDA (and no --dry-run); 1 if the loss is not finite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from gpu_bagel7b import bagel7b_config, device_info, randomize_  # noqa: E402

from strokes.model.network.tokenizer import BagelTokenizer  # noqa: E402
from strokes.model.network.vae import AutoEncoder  # noqa: E402
from strokes.model.testing.tiny import PRESETS, tiny_config  # noqa: E402
from strokes.model.testing.tiny_data import write_samples  # noqa: E402
from strokes.model.testing.tiny_tokenizer import write_tiny_tokenizer  # noqa: E402
from strokes.model.training.data import TrainData, pack_config_of  # noqa: E402
from strokes.model.training.forward import ForwardOptions, TrainingBagel  # noqa: E402
from strokes.model.training.lora import LoRAConfig, apply_lora  # noqa: E402
from strokes.model.training.losses import LossWeights, local_totals, reduce_losses  # noqa: E402
from strokes.model.training.optim import OptimConfig, make_optimizer, optimizer_step  # noqa: E402
from strokes.model.training.plan import SpecialTokens, compile_sample  # noqa: E402
from strokes.model.training.samples import load_samples  # noqa: E402

STARTED = time.perf_counter()
TARGET_S = 1.5


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {msg}", file=sys.stderr, flush=True)


def build(cfg, device: torch.device) -> tuple[TrainingBagel, AutoEncoder]:
    """The model in bf16 and the VAE in float32, materialised and filled on `device`."""
    with torch.device("meta"):
        model, vae = TrainingBagel(cfg), AutoEncoder(cfg.vae)
    model = model.to(torch.bfloat16).to_empty(device=device)
    vae = vae.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    randomize_(model, gen)
    model.init_position_tables()
    randomize_(vae, gen, vae=True)
    vae.eval().requires_grad_(False)
    return model.train(), vae


def pack_batch(cfg, tokenizer: BagelTokenizer, size: int, work: Path):
    """The ~10k-token pack (dry run: the same trajectories at `size` pixels)."""
    data = write_samples(work, size=size, think=True)
    tokens = SpecialTokens(
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.start_of_image, tokenizer.end_of_image
    )
    plans = [compile_sample(s, tokenizer.encode, tokens) for s in load_samples(data)]
    loader = TrainData(plans, cfg, pack_config_of(cfg, tokens, 0.0, 0.0, 0.0), max_tokens=1 << 20, seed=0)
    return loader.load_pack(0, list(range(len(plans))))


def run(args) -> dict:
    dry = args.dry_run
    device = torch.device("cpu" if dry else args.device)
    if dry:
        torch.set_num_threads(1)
    cfg = tiny_config(PRESETS["tiny"]) if dry else bagel7b_config()
    result: dict = {
        "benchmark": "gpu_train",
        "dry_run": dry,
        "config": "tiny (dry run)"
        if dry
        else "BAGEL-7B-MoT shape, random bf16 weights, LoRA rank 16 (both experts)",
        "machine": device_info(device),
        "target_step_s": TARGET_S,
    }
    log(f"building the model on {device} ...")
    t0 = time.perf_counter()
    model, vae = build(cfg, device)
    lora = LoRAConfig(rank=16, alpha=32.0)
    apply_lora(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    result["lora_parameters"] = sum(p.numel() for p in params)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp) / "tok", vocab_size=384)
        tokenizer = BagelTokenizer.from_folder(Path(tmp) / "tok")
        batch = pack_batch(cfg, tokenizer, 64 if dry else 512, Path(tmp) / "data")
    result["pack"] = {
        "tokens": batch.sequence_length,
        "samples": len(batch.sample_lens),
        "ce_tokens": batch.num_ce,
        "mse_tokens": batch.num_mse,
        "vit_tokens": 0 if batch.vit_tokens is None else len(batch.vit_tokens),
        "images": len(batch.vae_images),
    }
    log(f"pack: {json.dumps(result['pack'])}")
    batch = batch.to(device)
    optim_cfg = OptimConfig(lr=2e-5, warmup_steps=0, total_steps=100)
    optimizer = make_optimizer(params, optim_cfg)
    opts = ForwardOptions(timestep_shift=1.0, checkpoint_layers=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)  # as the trainer runs bf16

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(i: int) -> tuple[float, float]:
        sync()
        t = time.perf_counter()
        with autocast:
            losses = model(batch, vae, opts)
        reduced = reduce_losses(losses, batch, local_totals(batch), LossWeights())
        reduced.loss.backward()
        optimizer_step(optimizer, params, i, optim_cfg)
        sync()
        return time.perf_counter() - t, reduced.loss.item()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log("warm-up step ...")
    warm, loss = step(0)
    result["warmup_step_s"] = round(warm, 3)
    times, losses = [], [loss]
    for i in range(1, args.steps + 1):
        seconds, loss = step(i)
        times.append(seconds)
        losses.append(loss)
        log(f"step {i}: {seconds:.3f} s, loss {loss:.4f}")
    median = statistics.median(times)
    result["step_s"] = round(median, 3)
    result["step_s_all"] = [round(t, 3) for t in times]
    result["tokens_per_s"] = round(batch.sequence_length / median, 1)
    result["losses"] = [round(x, 4) for x in losses]
    result["finite"] = all(x == x and abs(x) != float("inf") for x in losses)
    result["peak_gb"] = (
        round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    )
    result["within_target"] = None if dry else median <= TARGET_S
    result["total_seconds"] = round(time.perf_counter() - STARTED, 1)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the tiny shape on the CPU, in seconds")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_train[.dry-run].json)")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_train: no CUDA device is available; use --dry-run for the tiny CPU check", file=sys.stderr)
        return 2
    if not args.dry_run:
        torch.cuda.set_device(torch.device(args.device))
        torch.backends.cuda.matmul.allow_tf32 = True
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    out = Path(args.out or REPO / "bench" / "results" / f"gpu_train{'.dry-run' if args.dry_run else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    log(f"wrote {out}")
    return 0 if result["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
