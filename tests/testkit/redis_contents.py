"""What Redis may hold: references to blobs, never the blobs themselves (checked over every key)."""

from __future__ import annotations

import redis


def redis_holds_references_only(url: str) -> None:
    """Every key, every value: no PNG signature and no trajectory (its stage records carry the
    generator's state, `"rng"`) anywhere, and no key larger than 16 KiB."""
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                values = [client.get(key)]
            elif kind == "hash":
                values = list(client.hgetall(key).values())
            elif kind == "stream":
                values = [v for _, fields in client.xrange(key) for v in fields.values()]
            elif kind == "zset":
                values = client.zrange(key, 0, -1)
            else:
                values = client.lrange(key, 0, -1) if kind == "list" else list(client.smembers(key))
            assert not any(b"\x89PNG" in v or b"iVBORw0KGgo" in v for v in values), key
            assert not any(b'"rng"' in v for v in values), key
            size = sum(len(v) for v in values)
            assert size < 16 * 1024, (key, size)
    finally:
        client.close()
