"""One process versus two on gloo (torchrun + FSDP2): the same samples give the same loss and the
same gradients, and the same training run.

The two-process side runs under torchrun (`python -m torch.distributed.run --nproc-per-node 2 -m
strokes.model.testing.train_equivalence --worker ...`), on the CPU with gloo, the model sharded with
`fully_shard`; each rank packs one of the two samples. The one-process side packs both samples into
one sequence. Per-sample draws (model/training/data.py) make the randomness the same on both sides,
so they may differ only by floating-point summation order. Each side writes, for the first step: the
global loss and every parameter's full gradient; then it runs `strokes train` for a few steps
(the real loop: sharded optimizer, clipping, DCP checkpoint, export) and keeps its log.
`compare` puts the two side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from strokes.model.training.base import load_base
from strokes.model.training.config import TrainConfig
from strokes.model.training.data import TrainData, geometry_of, pack_config_of
from strokes.model.training.distributed import all_sum, setup, shard
from strokes.model.training.forward import ForwardOptions
from strokes.model.training.losses import LossWeights, TokenTotals, reduce_losses
from strokes.model.training.plan import compile_sample, plan_tokens
from strokes.model.training.samples import load_samples
from strokes.model.training.trainer import train

DROPOUT = 0.3  # conditioning dropout on: its draws must be per sample too
STEPS = 3
NOISE = 1e-6  # a gradient whose every element is below this is rounding noise


def _config(data: Path, checkpoint: Path, out: Path, max_tokens: int) -> TrainConfig:
    return TrainConfig(
        data=str(data),
        checkpoint=str(checkpoint),
        out=str(out),
        mode="full",
        steps=STEPS,
        lr=1e-3,
        warmup_steps=0,
        schedule="constant",
        max_tokens=max_tokens,
        text_dropout=DROPOUT,
        vit_dropout=DROPOUT,
        vae_dropout=DROPOUT,
        precision="fp32",
        activation_checkpointing=True,
        log_every=1,
        save_every=STEPS,
        ema=0.99,  # kept as FSDP2 shards on two processes, gathered for the export
        num_workers=0,
        device="cpu",
        resume="never",
    )


def run_side(checkpoint: Path, data: Path, out: Path) -> None:
    """One side (one process, or one rank of two): first-step loss and gradients, then a short run."""
    torch.set_num_threads(1)
    d = setup("cpu")
    base = load_base(checkpoint)
    model = shard(base.model, bf16=False) if d.enabled else base.model
    tok = base.tokenizer
    plans = [compile_sample(s, tok.encode, base.special_tokens) for s in load_samples(data)]
    geometry = geometry_of(base.cfg)
    tokens = [plan_tokens(p, geometry) for p in plans]
    max_tokens = max(tokens) if d.enabled else sum(tokens)  # two ranks: a sample each; one: both
    pack_cfg = pack_config_of(base.cfg, base.special_tokens, DROPOUT, DROPOUT, DROPOUT)
    loader = TrainData(
        plans, base.cfg, pack_cfg, max_tokens=max_tokens, seed=7, world_size=d.world_size, rank=d.rank
    )
    (mine,) = loader.my_packs(loader.epoch_packs(0), 0)
    batch = loader.load_pack(0, mine)
    losses = model(batch, base.vae, ForwardOptions(checkpoint_layers=True, all_heads=d.enabled))
    ce_n, mse_n, w_sum = all_sum([batch.num_ce, batch.num_mse, float(batch.ce_weights.sum())], d)
    reduced = reduce_losses(
        losses, batch, TokenTotals(int(ce_n), int(mse_n), w_sum, d.world_size), LossWeights()
    )
    reduced.loss.backward()
    (loss,) = all_sum([reduced.loss.item()], d)
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.detach().clone()
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"loss": loss / d.world_size, "grads": grads, "samples": mine}, out / "step1.pt")
    model.zero_grad(set_to_none=True)
    train(_config(data, checkpoint, out / "run", max_tokens))  # the same process group; ends it


@dataclass
class Report:
    loss_single: float
    loss_two: float
    loss_rel: float
    grad_max_rel: float  # max over tensors of max |diff| / max |single|, for gradients above 1e-6
    grad_noise_max_abs: float  # max |diff| of the gradients below 1e-6 (analytically zero: rounding noise)
    grad_tensors: int
    run_losses_single: list[float]
    run_losses_two: list[float]
    run_max_rel: float

    def ok(self, grad_rtol: float = 1e-4, loss_rtol: float = 1e-5, run_rtol: float = 1e-4) -> bool:
        return (
            self.loss_rel <= loss_rtol
            and self.grad_max_rel <= grad_rtol
            and self.grad_noise_max_abs <= NOISE
            and self.run_max_rel <= run_rtol
        )


def _run_losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def compare(single: Path, two: Path) -> Report:
    a, b = torch.load(single / "step1.pt"), torch.load(two / "step1.pt")
    names = sorted(set(a["grads"]) | set(b["grads"]))
    worst = noise = 0.0
    for name in names:
        ga = a["grads"].get(name)
        gb = b["grads"].get(name)
        ga = torch.zeros_like(gb) if ga is None else ga  # a head unused on one side has no gradient
        gb = torch.zeros_like(ga) if gb is None else gb
        scale, diff = ga.abs().max().item(), (ga - gb).abs().max().item()
        if scale >= NOISE:
            worst = max(worst, diff / scale)
        else:  # e.g. the ViT's k_proj bias, which cannot change the softmax (golden/train/README.md)
            noise = max(noise, diff)
    la, lb = _run_losses(single / "run"), _run_losses(two / "run")
    run_rel = max(abs(x - y) / abs(x) for x, y in zip(la, lb, strict=True))
    rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
    return Report(a["loss"], b["loss"], rel, worst, noise, len(names), la, lb, run_rel)


def run_equivalence(checkpoint: Path, data: Path, work: Path, port: int) -> Report:
    """Both sides (the one-process side in a subprocess too, so both start alike); returns the report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [
        "-m",
        "strokes.model.testing.train_equivalence",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data),
    ]
    subprocess.run([sys.executable, *args, "--out", str(work / "one")], check=True, env=env, timeout=600)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
    ]
    subprocess.run([*torchrun, *args, "--out", str(work / "two")], check=True, env=env, timeout=600)
    return compare(work / "one", work / "two")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    run_side(Path(args.checkpoint), Path(args.data), Path(args.out))


if __name__ == "__main__":
    main()
