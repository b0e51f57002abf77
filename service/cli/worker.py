"""`strokes worker --checkpoint DIR --device cuda:0|cpu --redis-url URL [--metrics-port P]`: load the
model once, then take jobs from Redis until SIGTERM (service/worker/main.py puts the process together).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from strokes.service.shared import logs
from strokes.service.shared.settings import Settings

log = logging.getLogger("strokes.worker")


def run_worker(args) -> int:
    from strokes.service.worker import main as worker_main
    from strokes.service.worker.metrics import WorkerMetrics

    overrides = {"redis_url": args.redis_url} if args.redis_url else {}
    settings = Settings(**overrides)
    logs.setup(settings.log_level, "worker")
    from strokes.model import devices as devicelib

    device, why = devicelib.resolve(args.device)
    devices = tuple(args.devices.split(",")) if args.devices else (device,)
    model = worker_main.ModelSpec(
        checkpoint=str(args.checkpoint),
        devices=devices,
        dtype=args.dtype,
        weights=args.weights,
        compile_cache=args.compile_cache,
        adapter=args.adapter,
        warm_device_bytes=settings.warm_device_bytes,
        warm_host_bytes=settings.warm_host_bytes,
    )
    metrics = WorkerMetrics(devices=list(devices))
    if args.metrics_port:
        try:
            metrics.serve(args.metrics_port, args.metrics_host)
        except OSError as exc:  # a port in use: one line, not a traceback
            log.error(
                "cannot serve metrics on %s:%s: %s", args.metrics_host, args.metrics_port, exc.strerror or exc
            )
            return 2
    if args.pipeline and (args.weights != "bf16" or args.compile_cache or args.adapter):
        log.error("--weights, --compile-cache and --adapter apply to the built-in pipeline, not --pipeline")
        return 2
    name = args.name or worker_main.default_name(model.device)
    factory = worker_main.factory_from_path(args.pipeline) if args.pipeline else worker_main.load_pipeline
    log.info("loading the model", extra={"checkpoint": model.checkpoint, "device": model.device, "why": why})
    from strokes.model.network.config import CheckpointError  # the worker loads torch anyway

    try:
        pipeline, executor = worker_main.load(settings, model, factory, metrics)
    except CheckpointError as exc:  # a missing, partial or mismatched folder; a device not there
        log.error("cannot load the model: %s", exc)
        return 2
    code = asyncio.run(worker_main.serve(settings, pipeline, name, model.device, metrics, executor))
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
        "--weights",
        default=os.environ.get("STROKES_WEIGHTS", "bf16"),
        choices=["bf16", "fp8"],
        help="fp8: the decoder layers' linear layers in FP8 (Ada/Hopper GPUs); default $STROKES_WEIGHTS or bf16",
    )
    p.add_argument(
        "--adapter",
        default=os.environ.get("STROKES_ADAPTER"),
        help="a LoRA adapter folder of `strokes train`, merged into the weights at load; default $STROKES_ADAPTER",
    )
    p.add_argument(
        "--compile-cache",
        default=os.environ.get("STROKES_COMPILE_CACHE"),
        help="compile the decoder's layers (torch.compile, inductor), keeping compiled artifacts in this "
        "folder across restarts; default $STROKES_COMPILE_CACHE, unset: eager",
    )
    p.add_argument("--redis-url", default=None, help="Redis to use (default: $STROKES_REDIS_URL)")
    p.add_argument("--name", default=None, help="consumer name, unique per worker (default host-device-pid)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics server")
    p.add_argument(
        "--pipeline",
        default=None,
        help="module:callable(ModelSpec) building another pipeline (tests, plugins)",
    )
    p.set_defaults(func=run_worker)
