"""The run's one random generator, recorded and restored: what makes a fork's replay exact.

Every stage of a trajectory records the generator's state after it (and, for an image that went
back into the context, just before its VAE posterior draw); a fork restores it (model/spec/forks.py
plans the fork, model/generation/run.py replays it).
"""

from __future__ import annotations

import base64

import numpy as np
import torch


def rng_state(generator: torch.Generator) -> str:
    """The generator's full state (CPU mt19937: 5056 bytes) as base64."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def set_rng_state(generator: torch.Generator, state: str) -> None:
    raw = np.frombuffer(base64.b64decode(state), dtype=np.uint8).copy()
    generator.set_state(torch.from_numpy(raw))
