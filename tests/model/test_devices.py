"""A worker's GPU memory, one figure per device from the process that uses it, and no CUDA context
on a GPU the leader does not use (model/devices.py, model/generation/loading.py); CUDA faked."""

from __future__ import annotations

import pytest
import torch

from strokes.model import devices as devicelib
from strokes.model.generation.loading import check_device
from strokes.model.network.config import CheckpointError


@pytest.fixture
def fake_cuda(monkeypatch):
    """Three fake GPUs; records every call that would touch a device."""
    touched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: touched.append(("set_device", str(d))))
    monkeypatch.setattr(
        torch.cuda, "memory_allocated", lambda d: touched.append(("allocated", str(d))) or 100
    )
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: touched.append(("peak", str(d))) or 200)
    monkeypatch.setattr(devicelib, "_reports", {})
    return touched


def test_checking_the_followers_devices_makes_none_of_them_current(fake_cuda):
    for device in ("cuda:0", "cuda:1", "cuda:2"):
        check_device(device)
    assert fake_cuda == []
    with pytest.raises(CheckpointError, match="only 3 GPUs exist"):
        check_device("cuda:3")


def test_memory_per_device_comes_from_the_process_that_uses_it(fake_cuda):
    devicelib.report(devicelib.DeviceMemory("cuda:1", 0, 0))  # what load_parallel_engine registers
    devicelib.report(devicelib.DeviceMemory("cuda:2", 7, 9))  # a follower's report after an image
    memory = devicelib.memory_by_device(["cuda:0", "cuda:1", "cuda:2"])
    assert memory == [
        devicelib.DeviceMemory("cuda:0", 100, 200),
        devicelib.DeviceMemory("cuda:1", 0, 0),
        devicelib.DeviceMemory("cuda:2", 7, 9),
    ]
    assert {device for _, device in fake_cuda} == {"cuda:0"}  # the followers' GPUs never touched


def test_the_workers_metrics_label_each_device(fake_cuda):
    from prometheus_client import CollectorRegistry

    from strokes.service.worker.metrics import WorkerMetrics

    devicelib.report(devicelib.DeviceMemory("cuda:1", 7, 9))
    metrics = WorkerMetrics(CollectorRegistry())
    metrics.devices = ["cuda:0", "cuda:1"]
    metrics.observe_gpu()
    value = metrics.registry.get_sample_value
    assert value("strokes_worker_gpu_memory_bytes") == 107
    assert value("strokes_worker_gpu_device_memory_bytes", {"device": "cuda:1", "kind": "peak"}) == 9
    assert value("strokes_worker_gpu_device_memory_bytes", {"device": "cuda:0", "kind": "allocated"}) == 100
