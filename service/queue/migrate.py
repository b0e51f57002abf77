"""Moving a deployment's Redis keys from the layout before the hash tag (`strokes:...`) to the
current one (`{strokes}:...`, keys.py): `strokes migrate-keys`.

Run it once, with the API, the workers and the webhook dispatcher stopped, against the server (or
the Sentinel master) they used, then start the new version: the queue, the running and finished
jobs, their events, idempotency keys and steer records carry on. Every key under the old prefix is
renamed (RENAME keeps the value and the TTL, and a stream's consumer groups and pending entries);
the values that name keys are rewritten: the admission sets' members (job-hash keys) and each job
hash's `active_key`. A key whose new name exists already (the new version ran first) is left where
it is and reported, except an empty stream with nothing pending (the queue or the outbox the new
version created at start), which the old one replaces. Safe to run again: a second run finds
nothing under the old prefix and nothing left to rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from strokes.service.queue import keys


@dataclass
class Migration:
    """What a run did (or, with dry_run, would do)."""

    moved: int = 0  # keys renamed
    rewritten: int = 0  # set members and job-hash fields that name a key, rewritten
    conflicts: list[str] = field(default_factory=list)  # old keys left alone: the new name is taken
    dry_run: bool = False


def _replaceable(client: Any, key: str) -> bool:
    """An empty stream with nothing pending: what the new version creates at start (XGROUP MKSTREAM)."""
    if client.type(key) != b"stream" or client.xlen(key) > 0:
        return False
    return all(int(group["pending"]) == 0 for group in client.xinfo_groups(key))


def _renamed(name: str, old: str, new: str) -> str:
    return new + name[len(old) :] if name.startswith(old) else name


def migrate(
    client: Any, old: str = keys.LEGACY_PREFIX, new: str = keys.PREFIX, *, dry_run: bool = False
) -> Migration:
    """Move every key under `old` to `new` on `client` (a blocking redis.Redis of one server)."""
    done = Migration(dry_run=dry_run)
    names = sorted(k.decode() for k in client.scan_iter(match=old + "*", count=1000))
    for name in names:
        target = _renamed(name, old, new)
        if client.exists(target):
            if not _replaceable(client, target):
                done.conflicts.append(name)
                continue
            if not dry_run:
                client.delete(target)
        if not dry_run:
            client.rename(name, target)
        done.moved += 1
    if dry_run:
        return done
    # Values that name keys: admission sets hold job-hash keys, a job hash names its owner's set.
    queued = new + keys.QUEUED.removeprefix(keys.PREFIX)
    active = new + keys.owner_active("*").removeprefix(keys.PREFIX)
    for set_key in [queued.encode(), *client.scan_iter(match=active, count=1000)]:
        for member in client.smembers(set_key):
            text = member.decode()
            if text.startswith(old):
                client.sadd(set_key, _renamed(text, old, new))
                client.srem(set_key, member)
                done.rewritten += 1
    for job_key in client.scan_iter(match=new + keys.job("*").removeprefix(keys.PREFIX), count=1000):
        if client.type(job_key) != b"hash":
            continue
        value = client.hget(job_key, "active_key")
        if value is not None and value.decode().startswith(old):
            client.hset(job_key, "active_key", _renamed(value.decode(), old, new))
            done.rewritten += 1
    return done
