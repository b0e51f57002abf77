"""The official loss reduction (train/pretrain_unified_navit.py), and per-kind loss metrics.

Per micro-step, over every rank (W = world size, counts all-reduced by the caller):
    ce  = sum(ce) * W / N_ce                      (N_ce counts the special-token positions too)
    ce  = sum(ce * w) * W / sum(w)                with ce_loss_reweighting (w = 1/sqrt(len)+1 per text)
    mse = sum over tokens of mean over channels * W / N_mse
    loss = ce_weight * ce + mse_weight * mse      (ce absent: loss = mse; mse absent: loss = ce)
then divided by the gradient accumulation steps. FSDP averages the gradients over the W ranks,
so the step equals one process's on all the ranks' tokens together.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from strokes.model.training.forward import TokenLosses
from strokes.model.training.packing import PackedBatch


@dataclass(frozen=True)
class LossWeights:
    ce: float = 1.0
    mse: float = 1.0
    ce_reweighting: bool = False


@dataclass(frozen=True)
class TokenTotals:
    """What one micro-step divides by: counts summed over every rank."""

    ce_tokens: int
    mse_tokens: int
    ce_weight_sum: float
    world_size: int = 1


@dataclass
class Reduced:
    loss: Tensor  # scalar, with gradient
    ce: Tensor | None  # scalar, detached
    mse: Tensor | None  # scalar, detached


def local_totals(batch: PackedBatch) -> TokenTotals:
    return TokenTotals(batch.num_ce, batch.num_mse, float(batch.ce_weights.sum()), 1)


def reduce_losses(
    losses: TokenLosses, batch: PackedBatch, totals: TokenTotals, weights: LossWeights, accumulation: int = 1
) -> Reduced:
    w = totals.world_size
    loss = None
    ce = mse = None
    if losses.ce is not None and totals.ce_tokens:
        if weights.ce_reweighting:
            ce = (losses.ce * batch.ce_weights.to(losses.ce)).sum() * w / totals.ce_weight_sum
        else:
            ce = losses.ce.sum() * w / totals.ce_tokens
        loss = ce * weights.ce
    if losses.mse is not None and totals.mse_tokens:
        mse = losses.mse.mean(dim=-1).sum() * w / totals.mse_tokens
        loss = mse * weights.mse if loss is None else loss + mse * weights.mse
    if loss is None:
        raise ValueError(f"samples {batch.ids}: no token carries loss")
    if losses.zero is not None:
        loss = loss + losses.zero
    return Reduced(
        loss / accumulation,
        None if ce is None else ce.detach(),
        None if mse is None else mse.detach(),
    )


@dataclass
class KindTotals:
    """Sums for per-kind means: CE over CE tokens, MSE (channel mean) over image tokens."""

    ce_sum: float = 0.0
    ce_tokens: int = 0
    mse_sum: float = 0.0
    mse_tokens: int = 0


def kind_totals(losses: TokenLosses, batch: PackedBatch) -> dict[str, KindTotals]:
    """Per sample kind, the detached sums of this batch (for the log: loss per kind)."""
    out: dict[str, KindTotals] = defaultdict(KindTotals)
    n = len(batch.kinds)
    if losses.ce is not None:
        sums = torch.zeros(n).index_add_(0, batch.ce_sample.cpu(), losses.ce.detach().float().cpu())
        counts = torch.bincount(batch.ce_sample.cpu(), minlength=n)
        for i, kind in enumerate(batch.kinds):
            out[kind].ce_sum += float(sums[i])
            out[kind].ce_tokens += int(counts[i])
    if losses.mse is not None:
        per_token = losses.mse.detach().float().mean(dim=-1).cpu()
        sums = torch.zeros(n).index_add_(0, batch.mse_sample.cpu(), per_token)
        counts = torch.bincount(batch.mse_sample.cpu(), minlength=n)
        for i, kind in enumerate(batch.kinds):
            out[kind].mse_sum += float(sums[i])
            out[kind].mse_tokens += int(counts[i])
    return dict(out)
