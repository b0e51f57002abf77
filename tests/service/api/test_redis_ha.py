"""The API in front of a replicated Redis (a master, a replica and a Sentinel on loopback): /readyz
names the master it writes to and refuses to call a replica ready."""

from __future__ import annotations

import pytest
from testkit.asgi import AppClient
from testkit.redis_ha import SentinelRedis

from strokes.service.shared.settings import Settings

pytestmark = pytest.mark.parametrize("sentinel_redis", [1], indirect=True)


def _settings(url: str, tmp_path) -> Settings:
    return Settings(redis_url=url, ready_requires_worker=False, blob_dir=tmp_path / "blobs")


async def test_readyz_names_the_master_the_sentinels_gave_and_a_replica_is_not_ready(
    sentinel_redis: SentinelRedis, tmp_path
):
    async with AppClient(_settings(sentinel_redis.url, tmp_path)) as client:
        reply = await client.get("/readyz")
        assert reply.status_code == 200, reply.text
        assert reply.json()["redis_master"] == sentinel_redis.master.address
    replica = sentinel_redis.servers[1]
    async with AppClient(_settings(replica.url, tmp_path)) as client:
        reply = await client.get("/readyz")
        assert reply.status_code == 503
        body = reply.json()
        assert (body["redis"], body["redis_master"]) == (True, replica.address)
        assert body["reason"] == f"redis at {replica.address} is a slave: writes are refused"
