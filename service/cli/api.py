"""`strokes api` (the HTTP API under uvicorn) and `strokes openapi` (openapi.yaml from the app).

`strokes api --host H --port P --redis-url URL` runs service/api/app.py's app;
`strokes openapi [--check]` writes (or checks) openapi.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from strokes.service.shared.settings import Settings


def settings_from_args(args, **extra: Any) -> Settings:
    overrides = {k: v for k, v in extra.items() if v is not None}
    if getattr(args, "redis_url", None):
        overrides["redis_url"] = args.redis_url
    return Settings(**overrides)


def run_api(args) -> int:
    import uvicorn

    from strokes.service.api.app import create_app
    from strokes.service.cli.main import port_in_use
    from strokes.service.shared import logs

    problem = port_in_use(args.host, args.port)
    if problem:
        print(f"strokes api: error: {problem}", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    logs.setup(settings.log_level, "api")
    app = create_app(settings)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_config=logs.uvicorn_log_config(),
        timeout_graceful_shutdown=5,
        limit_concurrency=settings.sse_max_streams + 256,
    )
    return 0


def run_openapi(args) -> int:
    from strokes.service.api.app import openapi_yaml

    text = openapi_yaml()
    path = Path(args.output)
    if args.check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            print(f"{path} is out of date: run `strokes openapi`")
            return 1
        print(f"{path} is up to date")
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("api", help="run the HTTP API (no model; needs Redis)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--redis-url", default=None, help="Redis to use (default: $STROKES_REDIS_URL)")
    p.set_defaults(func=run_api)

    p = subparsers.add_parser("openapi", help="write openapi.yaml from the app")
    p.add_argument(
        "--output",
        "-o",
        default=str(Path(__file__).resolve().parents[2] / "openapi.yaml"),
        help="where to write the document",
    )
    p.add_argument("--check", action="store_true", help="fail if the file differs")
    p.set_defaults(func=run_openapi)
