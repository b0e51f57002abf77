"""One process versus two gloo processes (torchrun + FSDP2): loss, gradients and a 3-step run compared.

Runs model/testing/train_equivalence.py on the golden tiny checkpoint with the synthetic
trajectories (two samples; one process packs both, each of two ranks packs one; conditioning
dropout 0.3 so the per-sample draws are exercised; activation checkpointing on) and reports the
relative differences. The same check is tests/model/training/test_train_distributed.py.

Usage: python bench/train_gloo.py [--json bench/results/train_gloo.json]
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from common import REPO, log, machine, write_json

TINY = REPO / "tests" / "fixtures" / "golden" / "tiny_ckpt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from strokes.model.testing.tiny_data import write_samples
    from strokes.model.testing.train_equivalence import run_equivalence

    work = Path(tempfile.mkdtemp(prefix="train-gloo-"))
    data = write_samples(work / "data", think=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    report = run_equivalence(TINY, data, work / "sides", port)
    seconds = time.perf_counter() - started
    log(f"done in {seconds:.1f} s")
    print(
        f"loss: one process {report.loss_single:.8f}, two processes {report.loss_two:.8f} (relative {report.loss_rel:.1e})"
    )
    print(f"gradients: {report.grad_tensors} tensors, max relative difference {report.grad_max_rel:.1e}")
    print(f"  (analytically zero ones: max absolute difference {report.grad_noise_max_abs:.1e})")
    print(
        f"3-step run losses: one {report.run_losses_single}, two {report.run_losses_two} (max relative {report.run_max_rel:.1e})"
    )
    print("PASS" if report.ok() else "FAIL")
    write_json(
        args.json,
        {"machine": machine(), "seconds": round(seconds, 1), "ok": report.ok(), "report": asdict(report)},
    )


if __name__ == "__main__":
    main()
