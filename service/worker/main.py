"""A worker process, put together: its model loaded once on its own torch thread (CPU workers sized
to their share of the cores), and every object of the loop built here and handed what it uses
(`strokes worker` parses its flags in service/cli/worker.py and calls `run`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from strokes.service.blobs import store as bloblib
from strokes.service.blobs.health import BlobStoreCollector
from strokes.service.blobs.store import BlobStore
from strokes.service.queue.client import connect
from strokes.service.queue.steering import Steering
from strokes.service.queue.store import Store
from strokes.service.shared.settings import Settings
from strokes.service.worker.loop import Worker, torch_thread
from strokes.service.worker.metrics import WorkerMetrics
from strokes.service.worker.runner import JobRunner, Pipeline

log = logging.getLogger("strokes.worker")


@dataclass(frozen=True)
class ModelSpec:
    """What a worker loads: the checkpoint onto its device(s)."""

    checkpoint: str
    devices: tuple[str, ...]  # one, or several: guidance branches in parallel (model/generation/parallel.py)
    dtype: str | None  # None: per device
    weights: str  # bf16, or fp8: the decoder layers' linear layers in FP8 (Ada/Hopper GPUs)
    compile_cache: str | None  # compile the decoder's layers, artifacts kept here; None: eager
    adapter: str | None  # a LoRA adapter folder of `strokes train`, merged into the weights at load
    warm_device_bytes: int  # warm contexts kept for forks and resumes (model/generation/warm.py) ...
    warm_host_bytes: int  # ... on the device, then in host memory

    @property
    def device(self) -> str:
        return self.devices[0]


PipelineFactory = Callable[[ModelSpec], Pipeline]


def load_pipeline(model: ModelSpec) -> Pipeline:
    """The real pipeline: BAGEL loaded once onto the device(s), with its warm contexts (a LoRA adapter
    merged in, FP8 weights, compiled layers on request)."""
    from strokes.model.generation.loading import load_engine
    from strokes.model.generation.parallel import load_parallel_engine
    from strokes.model.generation.pipeline import Pipeline as ModelPipeline
    from strokes.model.generation.warm import WarmContexts
    from strokes.model.network.compiled import CompileOptions

    if len(model.devices) > 1:
        engine = load_parallel_engine(
            model.checkpoint,
            list(model.devices),
            model.dtype,
            model.weights,
            model.compile_cache,
            model.adapter,
        )
    else:
        compile_options = CompileOptions(cache_dir=model.compile_cache) if model.compile_cache else None
        engine = load_engine(
            model.checkpoint,
            device=model.device,
            dtype=model.dtype,
            weights=model.weights,
            compile=compile_options,
            adapter=model.adapter,
        )
    return ModelPipeline(engine, warm=WarmContexts(model.warm_device_bytes, model.warm_host_bytes))


def factory_from_path(path: str) -> PipelineFactory:
    """`module:callable` -> the callable (an alternative pipeline for tests or plugins)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name or "load_pipeline")


def cpu_share(settings: Settings) -> int:
    """Torch threads of a CPU worker: STROKES_TORCH_THREADS, else OMP_NUM_THREADS, else this
    process's cores divided by STROKES_LOCAL_WORKERS (workers on one machine that each take every
    core fight over them: two 256 px jobs took 100 s each, against 12 s alone)."""
    if settings.torch_threads:
        return settings.torch_threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // settings.local_workers)


def size_torch_threads(settings: Settings) -> int:
    """On the torch thread (OpenMP's thread count is per calling thread): set and return it."""
    import torch

    threads = cpu_share(settings)
    torch.set_num_threads(threads)
    return threads


def default_name(device: str) -> str:
    return f"{socket.gethostname()}-{device.replace(':', '')}-{os.getpid()}"


def load(
    settings: Settings, model: ModelSpec, factory: PipelineFactory, metrics: WorkerMetrics
) -> tuple[Pipeline, concurrent.futures.ThreadPoolExecutor]:
    """The pipeline, loaded on the torch thread that will run it (CheckpointError: unusable)."""
    began = time.perf_counter()
    executor = torch_thread()
    if model.device == "cpu":
        threads = executor.submit(size_torch_threads, settings).result()
        log.info("torch threads sized", extra={"threads": threads})
    try:
        pipeline = executor.submit(factory, model).result()
    except BaseException:
        executor.shutdown()
        raise
    metrics.model_load_seconds.set(time.perf_counter() - began)
    metrics.observe_gpu()
    log.info("model loaded", extra={"seconds": round(time.perf_counter() - began, 3)})
    return pipeline, executor


async def serve(
    settings: Settings,
    pipeline: Pipeline,
    name: str,
    device: str,
    metrics: WorkerMetrics,
    executor: concurrent.futures.ThreadPoolExecutor,
) -> int:
    """Build the loop's objects, run it until SIGTERM; the process's exit status."""
    client = connect(
        settings.redis_address,
        timeout_s=max(5.0, settings.poll_block_ms / 1000 + 3),
        connect_timeout_s=2.0,
        max_connections=32,
    )
    blobs = bloblib.open_store(settings)
    worker = build_worker(settings, client, pipeline, name, metrics, blobs, executor)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    try:
        await worker.publish(device)
        await worker.run()
    finally:
        await blobs.close()
        await worker.store.close()
    return worker.exit_code


def build_worker(
    settings: Settings,
    client: aioredis.Redis,
    pipeline: Pipeline,
    name: str,
    metrics: WorkerMetrics,
    blobs: BlobStore,
    executor: concurrent.futures.ThreadPoolExecutor,
) -> Worker:
    """The loop and everything it uses, on one Redis client: the store and steering's scripts, the
    runner on the torch thread `executor` (the one the model was loaded on)."""
    metrics.registry.register(BlobStoreCollector(blobs.health))  # the store's state, scraped
    store = Store(client, settings)
    steering = Steering(client, settings)
    runner = JobRunner(store, steering, pipeline, settings, name, metrics, blobs, executor)
    return Worker(store, steering, runner, blobs, settings, name, metrics)
