"""`strokes migrate-keys [--redis-url URL] [--dry-run]`: move a deployment's Redis keys from the
layout before the `{strokes}` hash tag to the current one (service/queue/migrate.py). Run it once
with the API, workers and dispatcher stopped; exit status 1 when a key could not be moved.
"""

from __future__ import annotations

import sys

from strokes.service.shared.settings import Settings


def run_migrate(args) -> int:
    from strokes.service.queue import keys
    from strokes.service.queue.client import RedisMode, connect_sync, parse_redis_url
    from strokes.service.queue.migrate import migrate

    overrides = {"redis_url": args.redis_url} if args.redis_url else {}
    settings = Settings(**overrides)
    target = parse_redis_url(settings.redis_address)
    if target.mode == RedisMode.cluster:
        print(
            "strokes migrate-keys: the old layout never ran on a cluster (its keys span slots); "
            "run it against the single server or Sentinel master the old version used",
            file=sys.stderr,
        )
        return 2
    client = connect_sync(settings.redis_address, timeout_s=30, connect_timeout_s=5, retries=1)
    try:
        done = migrate(client, dry_run=args.dry_run)
    finally:
        client.close()
    verb = "would move" if done.dry_run else "moved"
    print(
        f"strokes migrate-keys: {verb} {done.moved} keys from {keys.LEGACY_PREFIX}* to {keys.PREFIX}* "
        f"({target.describe()}); {done.rewritten} key names inside values rewritten"
    )
    for name in done.conflicts:
        print(f"  not moved: {name} (its new name exists already)", file=sys.stderr)
    return 1 if done.conflicts else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "migrate-keys", help="move Redis keys from strokes:* to {strokes}:* (once, with the service stopped)"
    )
    p.add_argument("--redis-url", default=None, help="default: $STROKES_REDIS_URL (or the Sentinels')")
    p.add_argument("--dry-run", action="store_true", help="count what would move, change nothing")
    p.set_defaults(func=run_migrate)
