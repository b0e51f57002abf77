"""The one device default of every command: `auto` = cuda:0 when CUDA is available, else cpu.

Commands take `--device` (default $STROKES_DEVICE, else `auto`) and resolve it where the model is
loaded, saying what they chose. torch is imported only when `auto` has to be resolved, so the
commands that merely pass the flag on (`strokes serve`, `strokes demo`) start without it.
"""

from __future__ import annotations

import os

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
