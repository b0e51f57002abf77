"""Fixtures of the model tests: the golden tiny checkpoint's engine, and a checkpoint written by the
project's own generator with its engine (GOLDEN and TINY, the paths, are in testkit.paths)."""

from __future__ import annotations

import pytest
import torch
from testkit.paths import TINY

from strokes.model.generation.loading import load_engine


@pytest.fixture(scope="session")
def engine():
    torch.set_num_threads(1)  # the machine is shared: one core per test process
    return load_engine(TINY, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def own_tiny(tmp_path_factory):
    """A checkpoint written by the project's own generator (make-tiny)."""
    from strokes.model.testing.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def own_engine(own_tiny):
    return load_engine(own_tiny, device="cpu", dtype=torch.float32)
