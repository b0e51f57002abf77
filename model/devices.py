"""The one device default of every command (`auto` = cuda:0 when CUDA is available, else cpu), and
the GPU memory of a worker's devices, one figure per device.

Commands take `--device` (default $STROKES_DEVICE, else `auto`) and resolve it where the model is
loaded, saying what they chose. torch is imported only when `auto` has to be resolved, so the
commands that merely pass the flag on (`strokes serve`, `strokes demo`) start without it.

Memory: a worker's devices are its own process's (the leader's device) or its followers'
(model/generation/parallel.py: each reports its allocator's figures to the leader after every
image, `report`). `memory_by_device` answers for each CUDA device from the process that uses it:
this process's allocator for its own devices, the latest report for a follower's, never a call on
a GPU this process does not use (that would open a CUDA context there). It never imports torch.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

AUTO = "auto"
HELP = "auto (cuda:0 when CUDA is available, else cpu), cpu or cuda:N; $STROKES_DEVICE overrides the default"


def default() -> str:
    return os.environ.get("STROKES_DEVICE") or AUTO


def resolve(device: str) -> tuple[str, str]:
    """(the device to use, why): `auto` becomes cuda:0 or cpu; anything else is kept."""
    if device != AUTO:
        return device, "as requested"
    import torch

    if torch.cuda.is_available():
        return "cuda:0", "auto: CUDA is available"
    return "cpu", "auto: no CUDA device"


@dataclass(frozen=True)
class DeviceMemory:
    device: str  # "cuda:1"
    allocated: int  # bytes held by tensors (torch's caching allocator)
    peak: int  # the most ever held


_reports: dict[str, DeviceMemory] = {}  # devices of other processes (followers), latest figures
_lock = threading.Lock()  # reports arrive on the torch thread; metrics read on the event loop's


def allocator_memory(device) -> DeviceMemory:
    """This process's allocator figures for a device it uses (zeros for the CPU)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return DeviceMemory(str(dev), 0, 0)
    return DeviceMemory(str(dev), torch.cuda.memory_allocated(dev), torch.cuda.max_memory_allocated(dev))


def report(memory: DeviceMemory) -> None:
    """Keep a follower's latest figures (the leader, after each image)."""
    with _lock:
        _reports[memory.device] = memory


def memory_by_device(devices: list[str]) -> list[DeviceMemory]:
    """One figure per CUDA device of `devices` (the worker's, in order; empty: this thread's
    current device): reported ones for followers' devices, this process's allocator for the rest.
    Empty when torch is not loaded or sees no GPU."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    cuda = (
        [d for d in devices if d.startswith("cuda")] if devices else [f"cuda:{torch.cuda.current_device()}"]
    )
    with _lock:
        reported = dict(_reports)
    return [reported.get(d) or allocator_memory(d) for d in cuda]
