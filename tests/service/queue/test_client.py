"""The Redis client (service/queue/client.py): the three kinds of address and their mistakes, the
Sentinel settings folded into one URL, and a client that follows a Sentinel failover by itself
(a real master, replica and Sentinel on loopback; the master is killed with -9 and the test waits
for the Sentinel to name the replica)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from redis.asyncio.sentinel import SentinelConnectionPool
from testkit.redis_ha import SentinelRedis, wait_until

from strokes.service.queue.client import (
    TRANSIENT,
    MasterConnection,
    RedisMode,
    SentinelMaster,
    connect,
    connect_sync,
    master_address,
    parse_redis_url,
    server_info,
)
from strokes.service.shared.settings import Settings


def test_a_direct_url_is_handed_over_as_it_is_and_described_without_its_password():
    target = parse_redis_url("rediss://:s3cret@cache.example.com:6380/2")
    assert (target.mode, target.url) == (RedisMode.direct, "rediss://:s3cret@cache.example.com:6380/2")
    assert target.describe() == "rediss://cache.example.com:6380/2"


def test_a_sentinel_url_names_every_sentinel_the_master_the_database_and_both_passwords():
    target = parse_redis_url(
        "redis+sentinel://app:p%40ss@10.0.0.1,10.0.0.2:26380,[::1]:26381/jobs/3?sentinel_password=s"
    )
    assert target.mode == RedisMode.sentinel
    assert target.nodes == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381))
    assert (target.master_name, target.db, target.username, target.password) == ("jobs", 3, "app", "p@ss")
    assert (target.sentinel_password, target.tls) == ("s", False)
    assert "p@ss" not in target.describe() and "jobs" in target.describe()
    assert parse_redis_url("rediss+sentinel://h/m").tls


def test_a_cluster_url_lists_its_startup_nodes_and_has_database_0_only():
    target = parse_redis_url("redis+cluster://:pw@n1:7000,n2")
    assert (target.mode, target.nodes, target.password) == (
        RedisMode.cluster,
        (("n1", 7000), ("n2", 6379)),
        "pw",
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:6379", "is not a URL"),
        ("memcached://h:1", "unknown scheme 'memcached'"),
        ("redis+sentinel://h1,h2", "names the master"),
        ("redis+sentinel://h1/m/x", "the database 'x' is not a number"),
        ("redis+sentinel://h1:port/m", "the port of 'h1:port' is not a number"),
        ("redis+sentinel://h1,,h2/m", "an empty host"),
        ("redis+sentinel://h1/m?timeout=3", "unknown option"),
        ("redis+cluster://h1/2", "database 0 only"),
    ],
)
def test_a_malformed_address_fails_at_start_naming_the_variable(url, message):
    with pytest.raises(ValidationError) as err:
        Settings(redis_url=url)
    assert "STROKES_REDIS_URL" in str(err.value) and message in str(err.value)


def test_sentinels_in_their_own_settings_become_one_sentinel_url_with_the_masters_credentials(monkeypatch):
    monkeypatch.setenv("STROKES_REDIS_URL", "redis://:pw@ignored:6379/4")
    monkeypatch.setenv("STROKES_REDIS_SENTINELS", "s1:26379, s2:26379,s3")
    monkeypatch.setenv("STROKES_REDIS_MASTER_NAME", "queue")
    monkeypatch.setenv("STROKES_REDIS_SENTINEL_PASSWORD", "a b")
    settings = Settings()
    assert (
        settings.redis_address == "redis+sentinel://:pw@s1:26379,s2:26379,s3/queue/4?sentinel_password=a%20b"
    )
    target = parse_redis_url(settings.redis_address)
    assert (target.password, target.sentinel_password, target.db) == ("pw", "a b", 4)
    assert Settings(redis_url="redis://h:1/0", redis_sentinels=[]).redis_address == "redis://h:1/0"
    with pytest.raises(ValidationError, match="STROKES_REDIS_SENTINELS"):
        Settings(redis_url="unix:///tmp/redis.sock")


@pytest.mark.parametrize("sentinel_redis", [1], indirect=True)
async def test_a_client_follows_a_sentinel_failover_by_itself(sentinel_redis: SentinelRedis):
    old = sentinel_redis.master
    client = connect(sentinel_redis.url, timeout_s=2, connect_timeout_s=0.5)
    blocking = connect_sync(sentinel_redis.url, timeout_s=2, connect_timeout_s=0.5)
    try:
        assert client.connection_pool.connection_class is MasterConnection  # never stays on a replica (below)
        await client.set("{strokes}:probe", "before")
        assert await master_address(client) == old.address
        assert (await server_info(client, "replication"))["role"] == "master"
        wait_until(
            lambda: old.info("replication")["slave0"]["offset"] > 0, 10, "the write to reach the replica"
        )
        old.kill()  # kill -9; the Sentinel promotes the replica after down-after-milliseconds
        new = sentinel_redis.wait_new_master(old)

        async def writes_on_the_new_master() -> bool:
            try:
                await client.set("{strokes}:probe", "after")
            except TRANSIENT:
                return False
            return await master_address(client) == new.address

        for _ in range(100):  # a connection or two fails first: the dead master's
            if await writes_on_the_new_master():
                break
        else:
            raise AssertionError("the client never wrote to the new master")
        assert (await server_info(client, "replication"))["role"] == "master"
        with new.client() as direct:
            assert direct.get("{strokes}:probe") == b"after"
        assert wait_until(lambda: blocking.get("{strokes}:probe"), 10, "the blocking client") == b"after"
    finally:
        blocking.close()
        await client.aclose()  # closes the Sentinel's clients as well (no unclosed-socket warning)


async def test_a_sentinel_client_never_stays_on_a_replica_a_stale_sentinel_names(
    replicated_redis: SentinelRedis,
):
    """Right after a failover a Sentinel may still name the old master, back as a replica: a
    connection that only reads would stay there (and WAIT is refused on a replica)."""
    replica = replicated_redis.servers[1]

    class StaleSentinels:  # names the replica, as one that has not heard of the failover yet would
        async def discover_master(self, name: str) -> tuple[str, int]:
            return "127.0.0.1", replica.port

        async def aclose(self) -> None:
            pass

    pool = SentinelConnectionPool("strokes", StaleSentinels(), connection_class=MasterConnection)
    client = SentinelMaster.from_pool(pool)
    try:
        with pytest.raises(TRANSIENT, match=f"127.0.0.1:{replica.port} is a slave, not the master"):
            await client.xread({"{strokes}:events:x": "0"})
    finally:
        await client.aclose()
