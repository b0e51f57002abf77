"""Save and resume a training run: model, optimizer, EMA, schedule step, data position, RNG.

Layout under the run folder:

    checkpoints/step_00000200/   one complete checkpoint
        train_state/             torch.distributed.checkpoint (DCP): the trainable parameters,
                                 the optimizer state and the EMA, each rank writing its shards
        rng.rank{R}.pt           python, numpy, torch (and CUDA) generator states of rank R
        meta.json                step, data position, world size, the run's fingerprint
    checkpoints/latest           the name of the newest complete checkpoint

A checkpoint is written into `step_N.tmp/` and renamed once every rank has written and meta.json
is in place, then `latest` is replaced atomically: a run killed at any moment leaves the previous
checkpoint intact and resumes from it, losing at most the steps since. (Several nodes need the
run folder on a filesystem they share.) The fingerprint names what a resume must agree with
(base checkpoint, dataset file, mode and adapters, world size, accumulation, packing, seed): any
difference fails at once, naming it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from strokes.model.training.data import DataPosition
from strokes.model.training.distributed import Dist, barrier
from strokes.model.training.optim import EMA

CHECKPOINTS = "checkpoints"
LATEST = "latest"
OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Setting back: the frozen tables are not in the state (DCP's load already failed on any key the
# checkpoint lacks), so a strict load would miss them.
SET_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class ResumeError(ValueError):
    """A checkpoint to resume from is missing, incomplete or from another run."""


@dataclass(frozen=True)
class Resumed:
    step: int
    position: DataPosition
    path: Path


def _quiet(fn, *args, **kwargs):
    """DCP warns that it runs in a single process when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch.distributed is disabled", category=UserWarning)
        return fn(*args, **kwargs)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    run: Path,
    step: int,
    position: DataPosition,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    fingerprint: dict,
    d: Dist,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of `step` (every rank calls this); returns its folder."""
    root = run / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    _quiet(dcp.save, _state(model, optimizer, ema), checkpoint_id=tmp / "train_state", no_dist=not d.enabled)
    torch.save(_rng_state(), tmp / f"rng.rank{d.rank}.pt")
    barrier(d)
    if d.main:
        meta = {
            "step": step,
            "epoch": position.epoch,
            "epoch_step": position.step,
            "world_size": d.world_size,
            "fingerprint": fingerprint,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / (LATEST + ".tmp")
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / LATEST)
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def find(run: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` = the run's latest (None in a new run), `never` = None,
    anything else a checkpoint folder that must exist and be complete."""
    if resume == "never":
        return None
    if resume == "auto":
        latest = run / CHECKPOINTS / LATEST
        if not latest.is_file():
            return None
        path = run / CHECKPOINTS / latest.read_text().strip()
    else:
        path = Path(resume)
    if not path.is_dir():
        raise ResumeError(f"{path}: checkpoint folder not found")
    if not (path / "meta.json").is_file() or not (path / "train_state").is_dir():
        raise ResumeError(f"{path}: not a complete strokes training checkpoint (meta.json, train_state/)")
    return path


def check_fingerprint(path: Path, saved: dict, current: dict) -> None:
    differ = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if differ:
        lines = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}" for k in differ)
        raise ResumeError(f"{path}: the resume does not match the run that wrote it ({lines})")


def load(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    fingerprint: dict,
    d: Dist,
) -> Resumed:
    """Restore everything `save` wrote, after checking the fingerprint (every rank calls this)."""
    meta = json.loads((path / "meta.json").read_text())
    check_fingerprint(path, meta["fingerprint"], fingerprint)
    if meta["world_size"] != d.world_size:
        raise ResumeError(f"{path}: written by {meta['world_size']} processes, this run has {d.world_size}")
    rng_file = path / f"rng.rank{d.rank}.pt"
    if not rng_file.is_file():
        raise ResumeError(f"{rng_file}: missing")
    state = _state(model, optimizer, ema)
    _quiet(dcp.load, state, checkpoint_id=path / "train_state", no_dist=not d.enabled)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=SET_OPTIONS,
    )
    if ema is not None:
        ema.load_state_dict(state["ema"])
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return Resumed(meta["step"], DataPosition(meta["epoch"], meta["epoch_step"]), path)


def load_weights(path: Path, model: nn.Module, ema: EMA | None) -> None:
    """Only the trained weights (and the EMA) of a checkpoint, into a model in one process."""
    model_sd = get_model_state_dict(model, options=OPTIONS)
    state = {"model": model_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    _quiet(dcp.load, state, checkpoint_id=path / "train_state", no_dist=True)
    set_model_state_dict(model, state["model"], options=SET_OPTIONS)
    if ema is not None:
        ema.load_state_dict(state["ema"])
