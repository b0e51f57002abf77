"""Replay the golden TRAINING cases of the official BAGEL code (golden/train/README.md).

A case NAME.json + NAME.safetensors holds official sequence plans with their token ids and images,
every random draw, every packed tensor, the forward's intermediates, per-token losses, the reduced
loss, every gradient, and the loss after each of two AdamW steps. The replay runs strokes's own
training path on the tiny checkpoint in float32 (model/training: packing, training forward, loss
reduction, clipping and AdamW) with the recorded draws injected, and compares, with the
README's recommended tolerances:
- packed integer tensors, timesteps and attention masks: exact; images and patches: 1e-6;
- forward intermediates and per-token ce / mse: max abs diff under 1e-4 x max(1, max |ref|);
- loss, ce, mse, ce with reweighting, grad norm: relative 1e-5;
- gradients: max abs diff under 1e-4 x max |ref grad| + 1e-7, and the same parameters without one;
- losses after AdamW steps 1 and 2: relative 1e-4; tracked parameters after each step: 1e-6 where
  |grad| > 1e-6 x max |grad| (elsewhere the first step is a sign step of rounding noise).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from strokes.model.network.transforms import ImageTransform
from strokes.model.training.base import Base, load_base
from strokes.model.training.forward import ForwardOptions, training_forward
from strokes.model.training.losses import LossWeights, local_totals, reduce_losses
from strokes.model.training.optim import OptimConfig, make_optimizer, optimizer_step
from strokes.model.training.packing import PackConfig, PackedBatch, SampleTensors, pack
from strokes.model.training.plan import ItemType, SamplePlan, official_item

FWD_RTOL = 1e-4
LOSS_RTOL = 1e-5
STEP_RTOL = 1e-4
PARAM_ATOL = 1e-6

PACKED = {  # golden key -> PackedBatch field (None: computed)
    "packed_text_ids": "text_ids",
    "packed_text_indexes": "text_indexes",
    "packed_position_ids": "position_ids",
    "packed_label_ids": "label_ids",
    "ce_loss_indexes": "ce_indexes",
    "packed_latent_position_ids": "latent_position_ids",
    "packed_vae_token_indexes": "vae_token_indexes",
    "packed_timesteps": "timesteps",
    "mse_loss_indexes": "mse_indexes",
    "packed_vit_position_ids": "vit_position_ids",
    "packed_vit_token_indexes": "vit_token_indexes",
}


class RecordedDraws:
    """The case's python `random.random()` and numpy `randn()` values, in their order."""

    def __init__(self, draws: list[dict]):
        self._uniform = iter([d["value"] for d in draws if d["rng"] == "python"])
        self._normal = iter([d["value"] for d in draws if d["rng"] == "numpy"])

    def uniform(self) -> float:
        return next(self._uniform)

    def normal(self) -> float:
        return next(self._normal)


@dataclass
class TrainDiffs:
    failures: list[str] = field(default_factory=list)
    checked: int = 0
    worst: dict[str, float] = field(default_factory=dict)

    def _worst(self, category: str, value: float) -> None:
        self.worst[category] = max(self.worst.get(category, 0.0), value)

    def exact(self, key: str, ours: torch.Tensor | None, ref: torch.Tensor) -> None:
        self.checked += 1
        if (
            ours is None
            or tuple(ours.shape) != tuple(ref.shape)
            or not torch.equal(ours.cpu().to(ref.dtype), ref)
        ):
            self.failures.append(f"{key}: differs from the reference")

    def close(
        self, category: str, key: str, ours: torch.Tensor | None, ref: torch.Tensor, tol: float
    ) -> None:
        """max |ours - ref| <= tol (an absolute bound the caller scales)."""
        self.checked += 1
        if ours is None:
            self.failures.append(f"{key}: not computed")
            return
        ours = ours.detach().float().cpu()
        if tuple(ours.shape) != tuple(ref.shape):
            self.failures.append(f"{key}: shape {list(ours.shape)} != reference {list(ref.shape)}")
            return
        diff = (ours - ref.float()).abs().max().item() if ref.numel() else 0.0
        self._worst(category, diff)
        if not diff <= tol:
            self.failures.append(f"{key}: max abs diff {diff:.3g} > {tol:.3g}")

    def relative(self, category: str, key: str, ours: float | None, ref: float | None, rtol: float) -> None:
        self.checked += 1
        if ref is None or ours is None:
            if ref is not None or ours is not None:
                self.failures.append(f"{key}: {ours} where the reference has {ref}")
            return
        rel = abs(ours - ref) / max(abs(ref), 1e-12)
        self._worst(category, rel)
        if not rel <= rtol:
            self.failures.append(f"{key}: {ours:.8g} vs reference {ref:.8g} (relative {rel:.2g})")


def case_samples(case: dict, tensors: dict[str, torch.Tensor]) -> list[SampleTensors]:
    """The case's official plans with their images through its transforms (ViT from the original)."""
    vae_t = ImageTransform(
        *[case["config"]["vae_transform"][k] for k in ("max_image_size", "min_image_size", "image_stride")]
    )
    vit_t = ImageTransform(
        *[case["config"]["vit_transform"][k] for k in ("max_image_size", "min_image_size", "image_stride")]
    )
    out = []
    for s, sample in enumerate(case["samples"]):
        texts = iter(t["ids"] for t in sample["texts"])
        image_of = {i: n for n, img in enumerate(sample["images"]) for i in img["plan_items"]}
        items = []
        for i, d in enumerate(sample["sequence_plan"]):
            ids = next(texts) if d["type"] == "text" else None
            items.append(official_item(d, ids, image_of.get(i, -1)))
        pil = [Image.fromarray(tensors[img["key"]].numpy()) for img in sample["images"]]
        plan = SamplePlan(f"s{s}", "golden", tuple(items))
        vae = {i.image: vae_t(pil[i.image]) for i in items if i.type == ItemType.vae_image}
        vit = {i.image: vit_t(pil[i.image]) for i in items if i.type == ItemType.vit_image}
        out.append(SampleTensors(plan, vae, vit))
    return out


def _check_packing(d: TrainDiffs, batch: PackedBatch, t: dict[str, torch.Tensor]) -> None:
    for key, name in PACKED.items():
        if f"packed.{key}" in t:
            d.exact(f"packed.{key}", getattr(batch, name), t[f"packed.{key}"])
    if "packed.vit_token_seqlens" in t:
        d.exact("packed.vit_token_seqlens", torch.tensor(batch.vit_seqlens), t["packed.vit_token_seqlens"])
    for key, ours in (
        ("ce_loss_weights", batch.ce_weights),
        ("padded_images", batch.padded_images if batch.vae_images else None),
        ("packed_vit_tokens", batch.vit_tokens),
    ):
        if f"packed.{key}" in t:
            d.close("packed", f"packed.{key}", ours, t[f"packed.{key}"], 1e-6)
    for s in range(len(batch.sample_lens)):
        d.exact(
            f"packed.nested_attention_mask.{s}",
            batch.attention_mask(s),
            t[f"packed.nested_attention_mask.{s}"],
        )


def _scale(ref: torch.Tensor) -> float:
    return max(1.0, ref.abs().max().item()) if ref.numel() else 1.0


def run_train_case(base: Base, json_path: Path) -> TrainDiffs:
    case = json.loads(json_path.read_text())
    t = load_file(str(json_path.with_suffix(".safetensors")))
    model, vae = base.model, base.vae
    d = TrainDiffs()
    cfg = case["config"]
    data = cfg["data_args"]
    pack_cfg = PackConfig(
        tokens=base.special_tokens,
        vae_downsample=data["vae_image_downsample"],
        max_latent_size=data["max_latent_size"],
        vit_patch=data["vit_patch_size"],
        vit_max_per_side=data["max_num_patch_per_side"],
        text_cond_dropout=data["text_cond_dropout_prob"],
        vit_cond_dropout=data["vit_cond_dropout_prob"],
        vae_cond_dropout=data["vae_cond_dropout_prob"],
    )
    batch = pack(case_samples(case, t), pack_cfg, RecordedDraws(case["draws"]))
    batch.posterior_eps, batch.flow_noise = t["noise.0"], t.get("noise.1")
    _check_packing(d, batch, t)
    batch = batch.to(next(model.parameters()).device)

    args = cfg["train_args"]
    weights = LossWeights(args["ce_weight"], args["mse_weight"], args["ce_loss_reweighting"])
    opts = ForwardOptions(timestep_shift=cfg["timestep_shift"], trace=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optim_cfg = OptimConfig(
        lr=args["lr"],
        warmup_steps=args["warmup_steps"],
        schedule=args["lr_scheduler"],
        beta1=args["beta1"],
        beta2=args["beta2"],
        eps=args["eps"],
        weight_decay=args["weight_decay"],
        max_grad_norm=args["max_grad_norm"],
    )
    optimizer = make_optimizer(params, optim_cfg)
    out = case["outputs"]

    losses = training_forward(model, vae, batch, opts)
    for key, value in losses.trace.items():
        if key in t:
            d.close("fwd", key, value, t[key], FWD_RTOL * _scale(t[key]))
    for key, value in (("out.ce", losses.ce), ("out.mse", losses.mse)):
        if key in t:
            d.close("out", key, value, t[key], FWD_RTOL * _scale(t[key]))
    totals = local_totals(batch)
    reduced = reduce_losses(losses, batch, totals, weights)
    d.relative("loss", "out.loss", reduced.loss.item(), out["loss"], LOSS_RTOL)
    d.relative("loss", "outputs.ce", None if reduced.ce is None else reduced.ce.item(), out["ce"], LOSS_RTOL)
    d.relative(
        "loss", "outputs.mse", None if reduced.mse is None else reduced.mse.item(), out["mse"], LOSS_RTOL
    )
    if out.get("ce_reweighted") is not None:
        rew = reduce_losses(losses, batch, totals, LossWeights(weights.ce, weights.mse, True))
        d.relative("loss", "outputs.ce_reweighted", rew.ce.item(), out["ce_reweighted"], LOSS_RTOL)
    reduced.loss.backward()

    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    for name in sorted(set(grads) | {k[5:] for k in t if k.startswith("grad.")}):
        ref = t.get(f"grad.{name}")
        if ref is None:
            d.failures.append(f"grad.{name}: computed, but the reference has none")
            continue
        d.close("grad", f"grad.{name}", grads.get(name), ref, FWD_RTOL * ref.abs().max().item() + 1e-7)
    for name in out["params_without_grad"]:
        if name in grads:
            d.failures.append(f"grad.{name}: the reference has none")

    tracked = case["optimizer"]["tracked_params"]
    named = dict(model.named_parameters())
    masks = {
        name: t[f"grad.{name}"].abs() > 1e-6 * t[f"grad.{name}"].abs().max()
        for name in tracked
        if f"grad.{name}" in t
    }
    norm, _ = optimizer_step(optimizer, params, 0, optim_cfg)
    d.relative("loss", "out.grad_norm", norm.item(), t["out.grad_norm"].item(), LOSS_RTOL)
    for step in (1, 2):
        for name in tracked:
            key = f"step{step}.param.{name}"
            if key in t and name in masks:
                ours, ref = named[name].detach(), t[key]
                d.close("param", key, ours[masks[name]], ref[masks[name]], PARAM_ATOL)
        losses = training_forward(model, vae, batch, ForwardOptions(timestep_shift=cfg["timestep_shift"]))
        reduced = reduce_losses(losses, batch, totals, weights)
        d.relative("step", f"step{step}.loss", reduced.loss.item(), t[f"step{step}.loss"].item(), STEP_RTOL)
        if step == 1:
            reduced.loss.backward()
            norm, _ = optimizer_step(optimizer, params, step, optim_cfg)
            d.relative("step", "step1.grad_norm", norm.item(), t["step1.grad_norm"].item(), STEP_RTOL)
    return d


def format_train_line(name: str, d: TrainDiffs) -> str:
    status = "PASS" if not d.failures else "FAIL"
    parts = [f"{k}={v:.2e}" for k, v in sorted(d.worst.items())]
    line = f"{status} {name:<20} checks={d.checked:<4} " + " ".join(parts)
    if d.failures:
        line += "\n    " + "\n    ".join(d.failures[:10])
    return line


def run_train_golden(
    folder: str | Path, checkpoint: str | Path, device: str = "cpu"
) -> tuple[list[str], bool]:
    """Every training case of `folder` (NAME.json + NAME.safetensors) on a fresh float32 copy of
    `checkpoint` each; returns (lines, all passed)."""
    folder = Path(folder)
    cases = sorted(p for p in folder.glob("*.json") if p.name != "manifest.json")
    if not cases:
        raise FileNotFoundError(f"{folder}: no golden training cases (*.json) found")
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    lines, ok = [], True
    for path in cases:
        base = load_base(checkpoint, device=device, dtype=torch.float32)
        diffs = run_train_case(base, path)
        ok &= not diffs.failures
        lines.append(format_train_line(f"train/{path.stem}", diffs))
    return lines, ok
