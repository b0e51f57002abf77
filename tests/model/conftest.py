"""Fixtures for the model tests: the golden tiny checkpoint and engines loaded from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from strokes.model.generation.loading import load_engine

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
TINY = GOLDEN / "tiny_ckpt"


@pytest.fixture(scope="session")
def engine():
    torch.set_num_threads(2)
    return load_engine(TINY, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def own_tiny(tmp_path_factory):
    """A checkpoint written by the project's own generator (make-tiny)."""
    from strokes.model.testing.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def own_engine(own_tiny):
    return load_engine(own_tiny, device="cpu", dtype=torch.float32)
