"""`strokes worker --checkpoint DIR --device cuda:0|cpu --redis-url URL [--metrics-port P]`: load
the model once on its own torch thread (CPU workers sized to their share of the cores), then run
the worker loop of worker.py until SIGTERM.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from strokes.service.blobs import store as bloblib
from strokes.service.queue.client import connect
from strokes.service.queue.store import Store
from strokes.service.shared import logs as slog
from strokes.service.shared.metrics import WorkerMetrics
from strokes.service.shared.settings import Settings
from strokes.service.worker.loop import Worker, torch_thread
from strokes.service.worker.runner import Pipeline

log = logging.getLogger("strokes.worker")
PipelineFactory = Callable[[str, str, "str | None"], Pipeline]  # (checkpoint, device, dtype)


def load_pipeline(
    checkpoint: str, device: str, dtype: str | None = None, adapter: str | None = None
) -> Pipeline:
    """The real pipeline: BAGEL loaded once onto `device` (a LoRA adapter merged in, if given)."""
    from strokes.model.generation.loading import load_engine
    from strokes.model.generation.pipeline import Pipeline as ModelPipeline

    return ModelPipeline(load_engine(checkpoint, device=device, dtype=dtype, adapter=adapter))


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


async def serve_worker(
    settings: Settings,
    pipeline: Pipeline,
    name: str,
    metrics: WorkerMetrics,
    executor: concurrent.futures.ThreadPoolExecutor | None = None,
) -> int:
    client = connect(
        settings.redis_url,
        timeout_s=max(5.0, settings.poll_block_ms / 1000 + 3),
        connect_timeout_s=2.0,
        max_connections=32,
    )
    store = Store(client, settings)
    images = bloblib.open_store(settings)
    worker = Worker(store, pipeline, settings, name, metrics, images=images, executor=executor)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    try:
        await worker.run()
    finally:
        await images.close()
        await store.close()
    return worker.exit_code


def run_worker(args) -> int:
    overrides = {"redis_url": args.redis_url} if args.redis_url else {}
    settings = Settings(**overrides)
    slog.setup(settings.log_level, "worker")
    metrics = WorkerMetrics()
    from strokes.model import devices as devicelib

    args.device, why = devicelib.resolve(args.device)
    devices = (
        args.devices.split(",") if args.devices else [args.device]
    )  # several: model/generation/parallel.py
    args.device, metrics.devices = devices[0], devices
    if args.metrics_port:
        try:
            metrics.serve(args.metrics_port, args.metrics_host)
        except OSError as exc:  # a port in use: one line, not a traceback
            log.error(
                "cannot serve metrics on %s:%s: %s", args.metrics_host, args.metrics_port, exc.strerror or exc
            )
            return 2
    name = args.name or default_name(args.device)
    factory = (
        factory_from_path(args.pipeline) if args.pipeline else partial(load_pipeline, adapter=args.adapter)
    )
    if len(devices) > 1 and not args.pipeline:
        from strokes.model.generation.parallel import load_parallel_pipeline

        def factory(checkpoint, device, dtype):
            return load_parallel_pipeline(checkpoint, devices, dtype, args.adapter)

    began = time.perf_counter()
    log.info(
        "loading the model", extra={"checkpoint": str(args.checkpoint), "device": args.device, "why": why}
    )
    from strokes.model.network.config import CheckpointError  # the worker loads torch anyway

    executor = torch_thread()
    if args.device == "cpu":
        threads = executor.submit(size_torch_threads, settings).result()
        log.info("torch threads sized", extra={"threads": threads})
    try:
        pipeline = executor.submit(factory, str(args.checkpoint), args.device, args.dtype).result()
    except CheckpointError as exc:  # a missing, partial or mismatched folder; a device not there
        log.error("cannot load the model: %s", exc)
        executor.shutdown()
        return 2
    metrics.model_load_seconds.set(time.perf_counter() - began)
    metrics.observe_gpu()
    log.info("model loaded", extra={"seconds": round(time.perf_counter() - began, 3)})
    from strokes.service.api.routes.studio import publish_worker  # the studio's /v1/info shows the device

    publish_worker(settings.redis_url, name, args.device)
    code = asyncio.run(serve_worker(settings, pipeline, name, metrics, executor))
    # Everything is handed back and closed: skip the interpreter's teardown (freeing the model and
    # torch's destructors take seconds on a busy machine, and a supervisor waits for our exit).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def register(subparsers) -> None:
    from strokes.model import devices

    p = subparsers.add_parser("worker", help="run a GPU worker: load the model, take jobs from Redis")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=os.environ.get("STROKES_CHECKPOINT"),
        required=not os.environ.get("STROKES_CHECKPOINT"),
        help="model folder (official BAGEL-7B-MoT layout); default $STROKES_CHECKPOINT",
    )
    p.add_argument("--device", default=devices.default(), help=devices.HELP)
    p.add_argument(
        "--devices",
        default=os.environ.get("STROKES_DEVICES"),
        help="several devices for one worker, e.g. cuda:0,cuda:1,cuda:2: guidance branches run in "
        "parallel, one per device (overrides --device)",
    )
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: per device)")
    p.add_argument(
        "--adapter",
        default=os.environ.get("STROKES_ADAPTER"),
        help="a LoRA adapter folder of `strokes train`, merged into the weights at load; default $STROKES_ADAPTER",
    )
    p.add_argument("--redis-url", default=None, help="Redis to use (default: $STROKES_REDIS_URL)")
    p.add_argument("--name", default=None, help="consumer name, unique per worker (default host-device-pid)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics server")
    p.add_argument(
        "--pipeline",
        default=None,
        help="module:callable(checkpoint, device, dtype) building another pipeline (tests, plugins)",
    )
    p.set_defaults(func=run_worker)
