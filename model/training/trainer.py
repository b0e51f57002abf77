"""The training loop of `strokes train`: full fine-tuning or LoRA, one process or many (torchrun +
FSDP2), with the official forward, reduction and optimizer order.

One optimizer step = `accumulation` micro-steps per rank, each on its own pack; per micro-step the
CE / MSE token counts are summed over the ranks and the loss is reduced as the official script does
(model/training/losses.py), divided by the accumulation, and back-propagated (FSDP2 syncs the
gradients on the last micro-step only). Then: clip (pre-clip norm reported), the learning rate of
the warmup-cosine schedule, AdamW, the EMA, zero_grad. Precision: `bf16` runs the forward under
autocast with float32 master weights (full fine-tuning keeps every weight in float32; LoRA keeps
the frozen base in bf16 and its adapters in float32); `fp32` runs everything in float32.
Activation checkpointing recomputes each decoder layer in the backward.

Every `log_every` steps rank 0 prints a progress line and appends a JSON object to log.jsonl
(loss, ce, mse, loss per sample kind, grad norm, lr, tokens/s, peak memory); every `save_every`
steps and at the end a checkpoint is written (model/training/checkpoint.py); at the end the
result is exported (model/training/export.py): an adapter for LoRA, an official checkpoint for
full fine-tuning.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from strokes.model import devices
from strokes.model.training import checkpoint as ckpt
from strokes.model.training.base import Base, load_base
from strokes.model.training.config import TrainConfig
from strokes.model.training.data import DataPosition, TrainData, pack_config_of
from strokes.model.training.distributed import Dist, all_sum, barrier, setup, shard, teardown
from strokes.model.training.export import export_adapter, export_checkpoint, gather_weights, merged_weights
from strokes.model.training.forward import ForwardOptions
from strokes.model.training.lora import LoRAConfig, apply_lora
from strokes.model.training.losses import KindTotals, LossWeights, TokenTotals, kind_totals, reduce_losses
from strokes.model.training.optim import EMA, make_optimizer, optimizer_step
from strokes.model.training.plan import compile_sample
from strokes.model.training.samples import load_samples


@dataclass
class TrainResult:
    steps: int  # steps done in all (resumed ones included)
    last: dict  # the last log record
    export: Path | None
    run: Path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(cfg: TrainConfig, base: Path, d: Dist) -> dict:
    """What a resume must agree with (model/training/checkpoint.py)."""
    configs = "".join(_sha256(base / name) for name in ("llm_config.json", "vit_config.json"))
    return {
        "base": str(base.resolve()),
        "base_config": hashlib.sha256(configs.encode()).hexdigest()[:16],
        "data": _sha256(Path(cfg.data))[:16],
        "mode": cfg.mode,
        "lora": asdict(cfg.lora()) if cfg.mode == "lora" else None,
        "ema": cfg.ema > 0,
        "world_size": d.world_size,
        "accumulation": cfg.accumulation,
        "max_tokens": cfg.max_tokens,
        "seed": cfg.seed,
    }


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since the start (CUDA allocator), or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss / 2**20


def progress_line(record: dict, total: int) -> str:
    filled = record["step"] * 20 // total
    kinds = " ".join(f"{k}={v:.4f}" for k, v in sorted(record.get("loss_per_kind", {}).items()))
    parts = [
        f"[{'#' * filled}{'.' * (20 - filled)}] step {record['step']}/{total}",
        f"loss {record['loss']:.4f}",
        f"ce {record['ce']:.4f}" if record.get("ce") is not None else "",
        f"mse {record['mse']:.4f}" if record.get("mse") is not None else "",
        f"lr {record['lr']:.2e}",
        f"gnorm {record['grad_norm']:.3f}",
        f"{record['tokens_per_s']:.0f} tok/s",
        f"mem {record['peak_memory_gb']:.2f} GB",
        f"({kinds})" if kinds else "",
    ]
    return " ".join(p for p in parts if p)


class _Window:
    """Sums over the steps since the last log record."""

    def __init__(self, kinds: list[str]):
        self.kinds = kinds
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.loss = self.ce = self.mse = 0.0
        self.ce_steps = self.mse_steps = 0
        self.tokens = 0.0
        self.seconds = 0.0
        self.per_kind = {k: KindTotals() for k in self.kinds}

    def add_kinds(self, totals: dict[str, KindTotals]) -> None:
        for kind, t in totals.items():
            k = self.per_kind.setdefault(kind, KindTotals())
            k.ce_sum += t.ce_sum
            k.ce_tokens += t.ce_tokens
            k.mse_sum += t.mse_sum
            k.mse_tokens += t.mse_tokens

    def kind_vector(self) -> list[float]:
        return [
            v
            for k in self.kinds
            for v in (
                self.per_kind[k].ce_sum,
                self.per_kind[k].ce_tokens,
                self.per_kind[k].mse_sum,
                self.per_kind[k].mse_tokens,
            )
        ]


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; see the module docstring."""
    device, _ = devices.resolve(cfg.device)
    d = setup(device)
    try:
        result = _train(cfg, d)
        # Every rank past its last collective (and the main rank past its export) before any rank
        # tears the group down: a gloo rank that leaves while a peer's transfer is still in flight
        # can abort the peer (seen once in CI: SIGABRT after the export). Not on an error: a
        # failed rank must exit at once, and torchrun then stops the others.
        barrier(d)
        return result
    finally:
        teardown(d)


def _say(d: Dist, message: str) -> None:
    if d.main:
        print(message, file=sys.stderr, flush=True)


def _train(cfg: TrainConfig, d: Dist) -> TrainResult:
    run = Path(cfg.out)
    samples = load_samples(cfg.data)  # bad data fails here, before any model is loaded
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
    base_dtype = torch.bfloat16 if (bf16 and cfg.mode == "lora") else torch.float32
    found = ckpt.find(run, cfg.resume)  # a missing or incomplete checkpoint fails here
    _say(
        d,
        f"loading {cfg.checkpoint} on {d.device} ({d.world_size} process(es), {'bf16' if bf16 else 'fp32'})",
    )
    base = load_base(cfg.checkpoint, d.device, base_dtype)
    model, vae, mcfg = base.model, base.vae, base.cfg
    lora_cfg = cfg.lora() if cfg.mode == "lora" else None
    modules = apply_lora(model, lora_cfg, cfg.seed) if lora_cfg else []
    if d.enabled:
        model = shard(model, bf16)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optim_cfg = cfg.optim()
    optimizer = make_optimizer(params, optim_cfg)
    ema = EMA(named, cfg.ema) if cfg.ema > 0 else None
    plans = [compile_sample(s, base.tokenizer.encode, base.special_tokens) for s in samples]
    pack_cfg = pack_config_of(mcfg, base.special_tokens, cfg.text_dropout, cfg.vit_dropout, cfg.vae_dropout)
    data = TrainData(
        plans,
        mcfg,
        pack_cfg,
        max_tokens=cfg.max_tokens,
        seed=cfg.seed,
        world_size=d.world_size,
        rank=d.rank,
        accumulation=cfg.accumulation,
        num_workers=cfg.num_workers,
    )
    prints = fingerprint(cfg, base.folder, d)
    step, position = 0, DataPosition()
    if found is not None:
        resumed = ckpt.load(found, model, optimizer, ema, prints, d)
        step, position = resumed.step, resumed.position
        _say(d, f"resumed from {found} at step {step} (epoch {position.epoch}, step {position.step} in it)")
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    trainable = sum(p.numel() for p in params)
    _say(
        d,
        f"{len(samples)} samples, {trainable:,} trainable parameters ({cfg.mode}), steps {step} -> {cfg.steps}",
    )

    weights = LossWeights(cfg.ce_weight, cfg.mse_weight, cfg.ce_reweighting)
    fwd = ForwardOptions(cfg.timestep_shift, cfg.activation_checkpointing, all_heads=d.enabled)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    kinds = sorted({s.kind for s in samples})
    window = _Window(kinds)
    last: dict = {}
    log_path = run / "log.jsonl"
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    model.train()
    for after, micro in data.steps(position) if step < cfg.steps else ():
        started = time.perf_counter()
        loss = ce = mse = 0.0
        has_ce = has_mse = False
        tokens = 0
        for i, batch in enumerate(micro):
            batch = batch.to(d.device)
            if d.enabled:
                model.set_requires_gradient_sync(i == len(micro) - 1)
            with autocast:
                losses = model(batch, vae, fwd)
            ce_n, mse_n, w_sum = all_sum([batch.num_ce, batch.num_mse, float(batch.ce_weights.sum())], d)
            totals = TokenTotals(int(ce_n), int(mse_n), w_sum, d.world_size)
            reduced = reduce_losses(losses, batch, totals, weights, cfg.accumulation)
            reduced.loss.backward()
            loss += reduced.loss.item()
            if reduced.ce is not None:
                ce, has_ce = ce + reduced.ce.item() / cfg.accumulation, True
            if reduced.mse is not None:
                mse, has_mse = mse + reduced.mse.item() / cfg.accumulation, True
            window.add_kinds(kind_totals(losses, batch))
            tokens += batch.sequence_length
        norm, lr = optimizer_step(optimizer, params, step, optim_cfg)
        if ema is not None:
            ema.update(named)
        step += 1
        loss, ce, mse, tokens = all_sum([loss, ce, mse, float(tokens)], d)
        window.steps += 1
        window.loss += loss / d.world_size
        window.ce += ce / d.world_size
        window.mse += mse / d.world_size
        window.ce_steps += has_ce
        window.mse_steps += has_mse
        window.tokens += tokens
        window.seconds += time.perf_counter() - started
        if step % cfg.log_every == 0 or step == cfg.steps:
            last = _log(window, step, after, float(norm), lr, d, cfg, log_path)
        if step % cfg.save_every == 0 or step == cfg.steps:
            ckpt.save(run, step, after, model, optimizer, ema, prints, d, cfg.keep)
        if step >= cfg.steps:
            break
    exported = _export(cfg, run, model, ema, modules, lora_cfg, base, d) if cfg.export != "none" else None
    return TrainResult(step, last, exported, run)


def _log(
    window: _Window,
    step: int,
    position: DataPosition,
    norm: float,
    lr: float,
    d: Dist,
    cfg: TrainConfig,
    log_path: Path,
) -> dict:
    vector = all_sum(window.kind_vector(), d)
    per_kind = {}
    for i, kind in enumerate(window.kinds):
        ce_sum, ce_n, mse_sum, mse_n = vector[4 * i : 4 * i + 4]
        value = (ce_sum / ce_n if ce_n else 0.0) + (mse_sum / mse_n if mse_n else 0.0)
        if ce_n or mse_n:
            per_kind[kind] = round(value, 6)
    record = {
        "step": step,
        "epoch": position.epoch,
        "loss": window.loss / window.steps,
        "ce": window.ce / window.ce_steps if window.ce_steps else None,
        "mse": window.mse / window.mse_steps if window.mse_steps else None,
        "loss_per_kind": per_kind,
        "grad_norm": norm,
        "lr": lr,
        "tokens_per_s": window.tokens / max(window.seconds, 1e-9),
        "step_seconds": window.seconds / window.steps,
        "peak_memory_gb": peak_memory_gb(d.device),
        "time": time.time(),
    }
    if d.main:
        print(progress_line(record, cfg.steps), flush=True)
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    window.reset()
    return record


def _export(
    cfg: TrainConfig,
    run: Path,
    model: torch.nn.Module,
    ema: EMA | None,
    modules: list[str],
    lora_cfg: LoRAConfig | None,
    base: Base,
    d: Dist,
) -> Path | None:
    weights = gather_weights(model, ema, d)
    if not d.main:
        return None
    kind = cfg.export if cfg.export != "auto" else ("adapter" if cfg.mode == "lora" else "checkpoint")
    if kind == "adapter":
        out = export_adapter(run / "export" / "adapter", weights, modules, lora_cfg, base.cfg, base.folder)
    else:
        if lora_cfg is not None:
            weights = merged_weights(weights, modules, lora_cfg)
        out = export_checkpoint(run / "export" / "checkpoint", base.folder, weights)
    _say(d, f"exported {kind}: {out}")
    return out
