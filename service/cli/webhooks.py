"""`strokes webhooks [--redis-url URL] [--name NAME] [--metrics-port P]`: the webhook dispatcher
(service/webhooks/dispatcher.py), a process apart from the API and the GPU workers.
"""

from __future__ import annotations

import asyncio
import os
import socket

from strokes.service.shared import logs
from strokes.service.shared.settings import Settings


def run_dispatcher(args) -> int:
    from strokes.service.webhooks import dispatcher
    from strokes.service.webhooks.metrics import WebhookMetrics

    overrides = {"redis_url": args.redis_url} if args.redis_url else {}
    settings = Settings(**overrides)
    logs.setup(settings.log_level, "webhooks")
    name = args.name or f"{socket.gethostname()}-webhooks-{os.getpid()}"
    metrics = WebhookMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_host)
    asyncio.run(dispatcher.serve(settings, name, metrics))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("webhooks", help="deliver webhooks from the outbox (docs/webhooks.md)")
    p.add_argument("--redis-url", default=None, help="default: $STROKES_REDIS_URL")
    p.add_argument("--name", default=None, help="consumer name, unique per dispatcher (default host-pid)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="0.0.0.0", help="default: 0.0.0.0")
    p.set_defaults(func=run_dispatcher)
