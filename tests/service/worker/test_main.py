"""The worker's factory: a CPU worker's share of the cores."""

from __future__ import annotations

from strokes.service.shared.settings import Settings
from strokes.service.worker.main import cpu_share


def test_cpu_workers_take_their_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_share(Settings(local_workers=2)) == 8
    assert cpu_share(Settings(local_workers=32)) == 1
    assert cpu_share(Settings(local_workers=2, torch_threads=3)) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cpu_share(Settings(local_workers=2)) == 5
