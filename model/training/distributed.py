"""Several processes, GPUs and nodes through torchrun and FSDP2, not a scheme of our own.

`setup(device)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): one process per GPU
(cuda:LOCAL_RANK, NCCL), or on CPU (gloo, for tests); without it, one process and no process
group. `shard(model, precision)` applies `torch.distributed.fsdp.fully_shard` to every decoder
layer, then to the root (embeddings, heads, the ViT and the connector: the ViT runs once per image
and a pack's images differ from rank to rank, so its layers cannot be units of their own, whose
all-gathers every rank must call alike): parameters live as float32 shards (the master weights),
are all-gathered in bf16 for compute with `MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)` and reduce-scattered with averaging, so each rank's gradient is the mean of
the ranks' (the loss reduction multiplies by the world size, as the official script does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from strokes.model.network.bagel import Bagel


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> Dist:
    """The process group of a torchrun launch (or none); `device` is the single-process device."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(0, 1, 0, torch.device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=world, device_id=dev if backend == "nccl" else None
        )
    return Dist(rank, world, local, dev)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(model: Bagel, bf16: bool) -> nn.Module:
    """FSDP2 over the model: each MoT layer a unit, the rest in the root's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for layer in model.language_model.model.layers:
        fully_shard(layer, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Sum numbers over the ranks (float64 on the process group's device)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
