"""The Redis client every process uses: one that fails fast and reconnects by itself (connect), what
counts as Redis being away (TRANSIENT), and the helpers of replies and script arguments.

Where Redis is (STROKES_REDIS_URL) is one of three kinds of address, parsed by `parse_redis_url`:

    redis://[[user]:password@]host:port/db        one server (or a managed endpoint that fails over
    rediss://...  unix:///path?db=N               behind one name); TLS; a socket
    redis+sentinel://[[user]:password@]host:port[,host:port...]/master_name[/db][?sentinel_password=P]
                                                  the master Redis Sentinel names; every new connection
                                                  asks the Sentinels first, so a failover is followed
                                                  by itself (rediss+sentinel: TLS to both)
    redis+cluster://[[user]:password@]host:port[,host:port...]
                                                  Redis Cluster (every key of the service shares the
                                                  `{strokes}` hash tag: one slot, keys.py)

Sentinels are given with or without a port (26379); cluster nodes likewise (6379). A password holding
`@`, `:` or `/` must be percent-encoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

# Redis is away (refused, reset, timed out): retry, reconnect, or answer 503; never a job's
# failure. The one definition every process uses. Not any OSError: redis-py turns its socket's
# errors into ConnectionError/TimeoutError, and an OSError from elsewhere (a damaged image, a full
# disk) is no Redis outage (the blob store's errors are not OSErrors at all: blobs/health.py).
TRANSIENT = (RedisError, ConnectionError, TimeoutError)

# What every process holds: one server's (or the Sentinels' master's) client, or a cluster's.
Client = aioredis.Redis | RedisCluster

SENTINEL_PORT = 26379
REDIS_PORT = 6379

# ---- addresses ----------------------------------------------------------------------------------


class RedisMode(str, Enum):
    direct = "direct"  # one address: a server, or a managed endpoint that fails over behind it
    sentinel = "sentinel"  # the master that Redis Sentinel names, asked for on every new connection
    cluster = "cluster"  # Redis Cluster: the node that serves the `{strokes}` slot


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is, parsed from the URL. `nodes` are the Sentinels (sentinel) or the cluster's
    startup nodes (cluster); a direct URL is handed to redis-py as it is (`url`)."""

    mode: RedisMode
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    tls: bool = False

    def describe(self) -> str:
        """The address without its secrets, for logs and /readyz."""
        if self.mode == RedisMode.direct:
            parts = urlsplit(self.url)
            return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
        nodes = ",".join(f"{h}:{p}" for h, p in self.nodes)
        if self.mode == RedisMode.sentinel:
            return f"sentinel {self.master_name} via {nodes} db {self.db}"
        return f"cluster via {nodes}"


def _nodes(netloc: str, default_port: int, url_name: str) -> tuple[tuple[str, int], ...]:
    out = []
    for part in netloc.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"{url_name}: an empty host in the host list")
        if part.startswith("["):  # [ipv6]:port
            host, _, rest = part[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        if not host:
            raise ValueError(f"{url_name}: no host in {part!r}")
        try:
            out.append((host, int(port) if port else default_port))
        except ValueError:
            raise ValueError(f"{url_name}: the port of {part!r} is not a number") from None
    return tuple(out)


def parse_redis_url(url: str, url_name: str = "STROKES_REDIS_URL") -> RedisTarget:
    """The URL's kind and parts; a malformed one fails with a message naming `url_name`."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"{url_name}: {url!r} is not a URL (redis://host:port/db)")
    scheme = scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget(RedisMode.direct, url)
    if scheme not in ("redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster"):
        raise ValueError(
            f"{url_name}: unknown scheme {scheme!r} (redis, rediss, unix, redis+sentinel, "
            "rediss+sentinel, redis+cluster, rediss+cluster)"
        )
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    options = {name: values[-1] for name, values in parse_qs(query, keep_blank_values=True).items()}
    unknown = set(options) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"{url_name}: unknown option(s) {sorted(unknown)} (only sentinel_password)")
    tls = scheme.startswith("rediss")
    segments = [unquote(s) for s in path.split("/") if s]
    if scheme.endswith("+cluster"):
        if segments not in ([], ["0"]):
            raise ValueError(f"{url_name}: a cluster has database 0 only (no path, or /0)")
        if "sentinel_password" in options:
            raise ValueError(f"{url_name}: sentinel_password belongs to a redis+sentinel URL")
        nodes = _nodes(hosts, REDIS_PORT, url_name)
        return RedisTarget(RedisMode.cluster, url, nodes, username=username, password=password, tls=tls)
    if not segments or len(segments) > 2:
        raise ValueError(
            f"{url_name}: a Sentinel URL names the master: redis+sentinel://hosts/master_name[/db]"
        )
    try:
        db = int(segments[1]) if len(segments) == 2 else 0
    except ValueError:
        raise ValueError(f"{url_name}: the database {segments[1]!r} is not a number") from None
    return RedisTarget(
        RedisMode.sentinel,
        url,
        _nodes(hosts, SENTINEL_PORT, url_name),
        master_name=segments[0],
        db=db,
        username=username,
        password=password,
        sentinel_password=options.get("sentinel_password") or None,
        tls=tls,
    )


# ---- the client ---------------------------------------------------------------------------------


class MasterConnection(SentinelManagedConnection):
    """A connection of the Sentinel master's pool that never stays on a replica. Right after a
    failover a Sentinel may still name the old master, back as a replica: a connection that only
    reads (SSE's XREAD) would stay there, and WAIT is refused on a replica. So a new connection
    asks the server's ROLE, and a WAIT refused for that reason drops the connection as a refused
    write does (redis-py's READONLY handling): the next one asks the Sentinels again."""

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health)
        if self.connection_pool.is_master:
            await self.send_command("ROLE", check_health=False)
            role = (await self.read_response())[0]
            role = role.decode() if isinstance(role, bytes) else str(role)
            if role != "master":
                raise RedisConnectionError(f"{self.host}:{self.port} is a {role}, not the master")

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if self.connection_pool.is_master and "cannot be used with replica instances" in str(exc):
                await self.disconnect()
                raise RedisConnectionError("the previous master is now a replica") from exc
            raise


class MasterSSLConnection(MasterConnection, SSLConnection):
    pass


class SentinelMaster(aioredis.Redis):
    """The client of the master a Sentinel names (`Sentinel.master_for`): closing it also closes
    the clients of the Sentinels it asks."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await self.connection_pool.sentinel_manager.aclose()


def connect(
    url: str, *, timeout_s: float, connect_timeout_s: float, max_connections: int = 1000, retries: int = 1
) -> Client:
    """A client that fails fast: short socket timeouts, one quick retry, health checks.

    It reconnects by itself: each command takes a connection from the pool and opens a new one
    after a failure, so nothing has to be restarted when Redis comes back. Through Sentinel, a new
    connection goes to the master the Sentinels name at that moment and checks that it is one (a
    connection to a master that became a replica is dropped at its first refused write or WAIT),
    so a failover needs nothing either. A cluster's client follows the slot's node.
    """
    target = parse_redis_url(url)
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.05), retries)
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "retry": retry,
        "health_check_interval": 15,
        "max_connections": max_connections,
        "decode_responses": False,
    }
    if target.mode == RedisMode.direct:
        return aioredis.Redis.from_url(url, **common)
    if target.mode == RedisMode.cluster:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username,
            password=target.password,
            ssl=target.tls,
            **common,
        )
    sentinel = Sentinel(
        target.nodes,
        sentinel_kwargs={
            # one slow Sentinel costs a connect timeout, then the next is asked
            "socket_timeout": min(timeout_s, 2.0),
            "socket_connect_timeout": connect_timeout_s,
            "password": target.sentinel_password,
            "ssl": target.tls,
        },
    )
    return sentinel.master_for(
        target.master_name,
        redis_class=SentinelMaster,
        connection_class=MasterSSLConnection if target.tls else MasterConnection,
        db=target.db,
        username=target.username,
        password=target.password,
        **common,
    )


class SyncSentinelMaster(redis.Redis):
    """SentinelMaster's blocking twin."""

    def close(self) -> None:
        super().close()
        self.connection_pool.sentinel_manager.close()


def connect_sync(url: str, *, timeout_s: float, connect_timeout_s: float, retries: int = 0) -> Any:
    """The blocking client of the same address (a thread that cannot await: the worker's pipeline
    thread reads the cancel flag with it). No retries by default: its caller polls."""
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode as SyncClusterNode
    from redis.cluster import RedisCluster as SyncRedisCluster
    from redis.retry import Retry as SyncRetry
    from redis.sentinel import Sentinel as SyncSentinel

    target = parse_redis_url(url)
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "retry": SyncRetry(NoBackoff(), retries),
    }
    if target.mode == RedisMode.direct:
        return redis.Redis.from_url(url, **common)
    if target.mode == RedisMode.cluster:
        return SyncRedisCluster(
            startup_nodes=[SyncClusterNode(host, port) for host, port in target.nodes],
            username=target.username,
            password=target.password,
            ssl=target.tls,
            **common,
        )
    sentinel = SyncSentinel(
        target.nodes,
        sentinel_kwargs={
            "socket_timeout": timeout_s,
            "socket_connect_timeout": connect_timeout_s,
            "password": target.sentinel_password,
            "ssl": target.tls,
        },
    )
    return sentinel.master_for(
        target.master_name,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.tls,
        **common,
    )


# ---- the server behind a client -------------------------------------------------------------------


async def slot_node(client: RedisCluster) -> Any:
    """The cluster node serving the service's one slot (every key has the `{strokes}` tag)."""
    from strokes.service.queue import keys

    await client.initialize()  # at once when the topology is known
    return client.get_node_from_key(keys.JOBS)


async def server_info(client: Client, section: str) -> dict[str, Any]:
    """INFO `section` of the server holding the service's keys (in a cluster: the slot's node)."""
    if isinstance(client, RedisCluster):
        return await client.info(section, target_nodes=await slot_node(client))
    return await client.info(section)


async def master_address(client: Client) -> str:
    """host:port of the server this client writes to: through Sentinel, the master the Sentinels
    name now; in a cluster, the node serving the service's slot."""
    if isinstance(client, RedisCluster):
        return (await slot_node(client)).name
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        # the address its last new connection was given (asked for again only when there is none)
        host, port = pool.master_address or await pool.get_master_address()
        return f"{host}:{port}"
    kwargs = pool.connection_kwargs
    return kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', REDIS_PORT)}"


# ---- replies ------------------------------------------------------------------------------------


def decode(value: Any) -> str:
    """A reply's bytes (or number) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def field_args(fields: dict[str, Any] | None) -> list[str]:
    """Job-hash fields as a script's trailing arguments: name, value, ... (non-strings as JSON)."""
    out: list[str] = []
    for key, value in (fields or {}).items():
        out += [key, value if isinstance(value, str) else json.dumps(value)]
    return out


def compact_json(value: Any) -> str:
    """A value as JSON without spaces (what scripts and records store)."""
    return json.dumps(value, separators=(",", ":"))
