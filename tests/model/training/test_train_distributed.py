"""Two processes on gloo (torchrun + FSDP2 `fully_shard`) give the loss and the gradients of one
process on the same samples, and the same training run (losses of three optimizer steps)."""

from __future__ import annotations

import socket
from pathlib import Path

from testkit.paths import TINY

from strokes.model.testing.tiny_data import write_samples
from strokes.model.testing.train_equivalence import run_equivalence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_loss_and_gradients_of_one(tmp_path: Path):
    data = write_samples(tmp_path / "data", think=False)
    report = run_equivalence(TINY, data, tmp_path / "work", free_port())
    assert report.ok(), report
    assert report.grad_tensors == 109  # every trainable tensor of the tiny model got a gradient
    assert len(report.run_losses_two) == 3
